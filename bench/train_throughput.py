"""Train-stage start-up overhead and throughput against stock Ray Train and the bare loop.

Runs, in one go on the same processed Fashion-MNIST, 1 worker each:
- the bare single-process PyTorch loop (the floor);
- stock Ray Train: the same loop in a TorchTrainer of Ray's documented shape, no dltrain set-up
  (bench/stock_ray_train.py, its own process);
- dltrain cold: `dltrain train -S train.ray_address=local` (a private Ray started for the run);
- dltrain warm: `make ray-up`, then `dltrain train` (train.ray_address: auto reuses that head);
- dltrain local mode: `dltrain train -S train.num_workers=0` (Ray Train's local mode: the loop
  in the stage's own process, no Ray started).

For each: the median epoch, its ratio to the floor's throughput, and the overhead (process wall
time minus the sum of epoch times). Rows alternate across --repeats rounds so that a drifting
host hits every row alike; each row reports its median round.

    .venv/bin/python bench/train_throughput.py [--epochs 3] [--repeats 2] [--write]
                                               [--only local]

--write replaces the "Train throughput" section of BENCHMARKS.md. --only local runs the floor
and the local-mode row alone (no Ray), for a quick look; it cannot be combined with --write.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BIN,
    REPO,
    ensure_processed,
    env,
    machine,
    run_stage,
    training_report,
    warm_ray,
    workspace_with,
)
from floor import bare_loop
from report import replace_section

STOCK_ROW = "stock Ray Train (TorchTrainer, cold)"
COLD_ROW = "dltrain cold (train.ray_address=local)"
WARM_ROW = "dltrain warm (make ray-up, train.ray_address=auto)"
LOCAL_ROW = "dltrain local mode (train.num_workers=0, no Ray started)"


def median_epoch(epochs: list[dict]) -> float:
    return statistics.median(e["epoch_time_s"] for e in epochs)


def stock(processed: Path, tmp: Path, epochs: int) -> tuple[float, list[dict]]:
    out = tmp / "stock.json"
    started = time.perf_counter()
    subprocess.run([str(BIN / "python"), str(REPO / "bench" / "stock_ray_train.py"),
                    str(processed), str(out), "--epochs", str(epochs)],
                   env=env(), check=True, capture_output=True, text=True)
    return time.perf_counter() - started, json.loads(out.read_text())["epochs"]


def dltrain(ws: Path, epochs: int, address: str, extra_env: dict[str, str], workers: int = 1
            ) -> tuple[float, list[dict]]:
    wall, _ = run_stage(ws, "train", f"train.epochs={epochs}", f"train.ray_address={address}",
                        f"train.num_workers={workers}", extra_env=extra_env)
    report = training_report(ws)
    return wall, report["epochs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--only", choices=["local"], help="the floor and local mode only")
    args = parser.parse_args()
    if args.only and args.write:
        parser.error("--only leaves rows out: it cannot --write the table")

    processed = ensure_processed(REPO / "data" / "processed")
    runs: dict[str, list[tuple[float, float]]] = {}  # row -> [(epoch_s, overhead_s)]
    floors = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        warm = {} if args.only else stack.enter_context(warm_ray(tmp / "ray"))
        ws = workspace_with(processed, tmp / "ws")
        for round_ in range(args.repeats):
            floor = bare_loop(processed, epochs=args.epochs)
            floors.append(floor["epoch_s"])
            print(f"round {round_ + 1}: floor {floor['epoch_s']:.2f} s/epoch", flush=True)
            rows = [(LOCAL_ROW, lambda: dltrain(ws, args.epochs, "local", {}, workers=0))]
            if not args.only:
                rows = [
                    (STOCK_ROW, lambda: stock(processed, tmp, args.epochs)),
                    (COLD_ROW, lambda: dltrain(ws, args.epochs, "local", {})),
                    (WARM_ROW, lambda: dltrain(ws, args.epochs, "auto", warm)),
                    *rows]
            for name, run in rows:
                wall, epochs = run()
                overhead = wall - sum(e["epoch_time_s"] for e in epochs)
                runs.setdefault(name, []).append((median_epoch(epochs), overhead))
                print(f"  {name}: epoch {median_epoch(epochs):.2f} s, overhead {overhead:.1f} s "
                      f"(wall {wall:.1f} s)", flush=True)

    floor_s = statistics.median(floors)
    rows = {name: (statistics.median(e for e, _ in r), statistics.median(o for _, o in r))
            for name, r in runs.items()}
    lines = ["| run (1 worker) | epoch (s, median) | ratio to floor | overhead (s, median) |",
             "|---|---|---|---|",
             f"| bare PyTorch loop (floor), 2 threads | {floor_s:.2f} | 1.00 | |"]
    for name, (epoch_s, overhead) in rows.items():
        lines.append(f"| {name} | {epoch_s:.2f} | {floor_s / epoch_s:.2f} | {overhead:.1f} |")
    local_epoch, local_o = rows[LOCAL_ROW]
    verdict = (f"Targets: local-mode overhead <= 3 s ({local_o:.1f} s: "
               f"{'met' if local_o <= 3 else 'NOT met'}); local-mode epoch >= 0.95 of the "
               f"floor's throughput ({floor_s / local_epoch:.2f}: "
               f"{'met' if floor_s / local_epoch >= 0.95 else 'NOT met'})")
    if not args.only:
        stock_o, (cold_epoch, cold_o), warm_o = (rows[STOCK_ROW][1], rows[COLD_ROW],
                                                 rows[WARM_ROW][1])
        verdict += (
            f"; dltrain cold overhead <= 0.8 x stock's ({cold_o:.1f} s vs "
            f"{0.8 * stock_o:.1f} s: {'met' if cold_o <= 0.8 * stock_o else 'NOT met'}); "
            f"dltrain warm overhead <= 0.5 x stock's ({warm_o:.1f} s vs {0.5 * stock_o:.1f} s:"
            f" {'met' if warm_o <= 0.5 * stock_o else 'NOT met'}); 1-worker epoch >= 0.9 of "
            f"the floor's throughput ({floor_s / cold_epoch:.2f}: "
            f"{'met' if floor_s / cold_epoch >= 0.9 else 'NOT met'})")
    verdict += "."
    table = "\n".join(lines)
    print(table)
    print(verdict)
    if args.write:
        body = (f"Machine: {machine()}. Fashion-MNIST, 54000 training samples, {args.epochs} "
                f"epochs per run, global batch 128, RMSprop; {args.repeats} alternating "
                f"rounds, the median of each row.\n\nCommand: `.venv/bin/python "
                f"bench/train_throughput.py --epochs {args.epochs} --repeats {args.repeats} "
                f"--write`\n\n{table}\n\n{verdict}\n")
        replace_section(REPO / "BENCHMARKS.md", "Train throughput", body)


if __name__ == "__main__":
    main()
