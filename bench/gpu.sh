#!/usr/bin/env bash
# The GPU path, end to end, on a machine with an NVIDIA GPU: run as is from the repo root.
#
#     bash bench/gpu.sh [EPOCHS]        (default 5)
#
# Sets up as `make setup` does (unless .venv is there), gets Fashion-MNIST (Debian's package,
# else the public mirrors) and preprocesses it, then trains EPOCHS epochs with
# train.use_gpu=true on a private Ray (the public-API TorchTrainer, NCCL, the shard resident on
# the device), and a bare single-process GPU loop of the same model on the same data. Prints
# both epoch times and their ratio, and the goal: an epoch of at most 0.1 s on one H200. With
# OUT set, the report and the log are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-5}
export PATH="$PWD/.venv/bin:$PATH"

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
  echo "bench/gpu.sh: no NVIDIA GPU found (nvidia-smi): this benchmark needs one" >&2
  exit 2
fi
[ -x .venv/bin/python ] || make setup
python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no GPU: ' + torch.__version__)"
[ -f data/processed/summary.json ] || dvc repro preprocess

log=$(mktemp)
dltrain train -S train.use_gpu=true -S train.epochs="$EPOCHS" -S train.ray_address=local \
  --resume never 2>&1 | tee "$log"
python - "$EPOCHS" <<'PY'
import json, statistics, sys
sys.path.insert(0, "bench")
from floor import bare_loop

epochs = int(sys.argv[1])
report = json.load(open("reports/training.json"))
stage = [e["epoch_time_s"] for e in report["epochs"]]
floor = bare_loop(__import__("pathlib").Path("data/processed"), epochs=epochs, device="cuda")
import torch
print(f"\nGPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, device {report['device']}")
print("| run | epoch times (s) | median (s) |")
print("|---|---|---|")
print(f"| bare GPU loop (floor) | {', '.join(f'{t:.3f}' for t in floor['epoch_times_s'])} "
      f"| {floor['epoch_s']:.3f} |")
print(f"| dltrain train, 1 GPU worker | {', '.join(f'{t:.3f}' for t in stage)} "
      f"| {statistics.median(stage):.3f} |")
print(f"ratio to the floor's throughput: {floor['epoch_s'] / statistics.median(stage):.2f}; "
      f"goal: epoch <= 0.1 s: {'met' if statistics.median(stage) <= 0.1 else 'NOT met'}; "
      f"Ray overhead {report['ray_overhead_s']:.1f} s; best val_acc "
      f"{max(e['val_accuracy'] for e in report['epochs']):.4f}")
PY
if [ -n "${OUT:-}" ]; then cp reports/training.json "$log" "$OUT"/; fi
