"""A sweep on Ray Tune against the same configs tried by hand (issue: `dltrain tune`).

Measures on this machine, in one run, on Fashion-MNIST, in a scratch clone:
1. `dltrain tune`: 8 trials x 3 epochs of params.yaml's example space (docs/tune.md), trials
   packed onto the CPUs, ASHA stopping poor ones early;
2. the same 8 configs (reports/tune.json's) one after another, each a `dvc exp run --temp`
   with train.num_workers=0 (local mode), as a user would try them without a sweep; and the
   default params as one more experiment, for reference.
It reports both wall times, the trial-epochs the scheduler saved, and the best validation
accuracy each way (the experiments' figures from their MLflow runs).

    .venv/bin/python bench/tune.py [--trials 8] [--epochs 3] [--write]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, REPO, clone_worktree, env, machine
from report import replace_section

TITLE = "Hyperparameter sweep against one-after-another experiments"


def streamed(args: list[str], cwd: Path, prefix: str) -> tuple[float, str]:
    """Run `args`, printing each output line as it comes (long work shows progress); returns
    its wall time and output."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        print(f"[{prefix}] {line.rstrip()}", flush=True)
    wall = time.perf_counter() - started
    if proc.wait():
        raise SystemExit(f"{' '.join(args)} failed:\n{''.join(lines[-30:])}")
    return wall, "".join(lines)


def git(clone: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid",
                    *args], cwd=clone, check=True, capture_output=True)


def set_sweep(clone: Path, trials: int, epochs: int) -> None:
    """The clone's params.yaml's sweep (the example space) with `trials` trials of `epochs`
    epochs, as a user edits it."""
    yaml = YAML()
    path = clone / "params.yaml"
    doc = yaml.load(path.read_text())
    doc["tune"]["num_samples"] = trials
    doc["tune"]["space"]["train.epochs"] = epochs
    out = io.StringIO()
    yaml.dump(doc, out)
    path.write_text(out.getvalue())


def exp_runs(clone: Path) -> dict[str, dict[str, float]]:
    """Each experiment's last val_accuracy and its test_accuracy, from the MLflow runs that
    register logged (tagged with the experiment's name) in the clone's embedded store."""
    from mlflow import MlflowClient

    from dltrain.tracking.runs import EXPERIMENT_TAG
    from dltrain.tracking.store import EXPERIMENT, embedded_tracking_uri

    client = MlflowClient(tracking_uri=embedded_tracking_uri(clone))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    found = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        name = run.data.tags.get(EXPERIMENT_TAG)
        if name:
            found[name] = {k: run.data.metrics.get(k) for k in ("val_accuracy", "test_accuracy")}
    return found


def overrides(config: dict) -> list[str]:
    return [arg for key, value in config.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def run(tmp: Path, trials: int, epochs: int, sweep_only: bool = False) -> str:
    clone = clone_worktree(tmp / "clone")
    dvc, dltrain = str(BIN / "dvc"), str(BIN / "dltrain")
    set_sweep(clone, trials, epochs)
    streamed([dvc, "repro", "preprocess"], clone, "data")  # not timed: both ways share it
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "-m", "baseline: the sweep's space and the processed data")

    sweep_s, _ = streamed([dltrain, "tune"], clone, "tune")
    print(f"[bench] the sweep: {sweep_s:.0f} s", flush=True)
    report = json.loads((clone / "reports" / "tune.json").read_text())
    if sweep_only:
        return f"`dltrain tune`: {sweep_s:.0f} s; report: {json.dumps(report)}"
    rows, exp_s = [], 0.0
    for i, trial in enumerate(report["trials"]):
        name = f"cfg-{i}"
        config = {"train.epochs": epochs, **trial["config"], "train.num_workers": 0}
        wall, _ = streamed([dvc, "exp", "run", "--temp", "-n", name, *overrides(config)],
                           clone, name)
        exp_s += wall
        rows.append((name, trial, wall))
        print(f"[bench] {name} ({i + 1} of {len(report['trials'])}): {wall:.0f} s, "
              f"{exp_s:.0f} s so far", flush=True)
    default_s, _ = streamed([dvc, "exp", "run", "--temp", "-n", "defaults", "-S",
                             "train.num_workers=0"], clone, "defaults")
    found = exp_runs(clone)
    return table(report, rows, found, sweep_s, exp_s, default_s)


def _acc(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def table(report: dict, rows: list, found: dict, sweep_s: float, exp_s: float,
          default_s: float) -> str:
    sweep, best = report["sweep"], report.get("best") or {}
    ran, budget = sweep["trial_epochs_run"], sweep["trial_epochs_budget"]
    best_exp = max((found.get(name, {}).get("val_accuracy") or 0.0 for name, _, _ in rows),
                   default=0.0)
    default = found.get("defaults", {})
    lines = ["| way | wall (s) | trial-epochs | best val accuracy |", "|---|---|---|---|",
             f"| `dltrain tune`: {len(rows)} trials, ASHA | {sweep_s:.0f} | {ran} of {budget} "
             f"({budget - ran} saved) | {_acc(best.get('val_accuracy'))} |",
             f"| the same configs as `dvc exp run --temp`, one after another | {exp_s:.0f} | "
             f"{budget} | {_acc(best_exp)} |",
             f"| (the default params, one `dvc exp run --temp`) | {default_s:.0f} | — | "
             f"{_acc(default.get('val_accuracy'))} (test {_acc(default.get('test_accuracy'))}) |",
             "", f"Sweep / experiments wall time: {sweep_s / exp_s:.2f}. Per config:", "",
             "| config | trial: status, epochs, val acc "
             "| experiment: val acc, test acc, wall (s) |",
             "|---|---|---|"]
    for name, trial, wall in rows:
        got = found.get(name, {})
        config = ", ".join(f"{k.split('.')[-1]}={json.dumps(v)}" for k, v in
                           trial["config"].items())
        mark = " **(best)**" if trial["trial_id"] == best.get("trial_id") else ""
        lines.append(f"| {config}{mark} | {trial['status']}, {trial['epochs']}, "
                     f"{_acc(trial.get('val_accuracy'))} | {_acc(got.get('val_accuracy'))}, "
                     f"{_acc(got.get('test_accuracy'))}, {wall:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sweep-only", action="store_true",
                        help="only the sweep (its wall time and report), no experiments")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    with open("/proc/loadavg") as fh:
        load_before = fh.read().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        text = run(Path(tmp), args.trials, args.epochs, args.sweep_only)
    with open("/proc/loadavg") as fh:
        load_after = fh.read().split()[:3]
    print(f"\n## {TITLE}\n{text}")
    if args.write and not args.sweep_only:
        body = (f"Machine: {machine()}; load average before {' '.join(load_before)}, after "
                f"{' '.join(load_after)}.\n\nCommand: `.venv/bin/python bench/tune.py --trials "
                f"{args.trials} --epochs {args.epochs} --write`\n\n{text}\n")
        replace_section(REPO / "BENCHMARKS.md", TITLE, body)


if __name__ == "__main__":
    main()
