"""Train-stage throughput against the bare-loop floor (issue: distributed training stage).

Runs, in one go on the same processed Fashion-MNIST: the bare single-process loop (floor), and
`dltrain train` with 1 worker and with 2 workers. Prints epoch time, samples/s, the ratio to
the floor, and Ray's overhead (stage wall time minus the sum of epoch times).

    .venv/bin/python bench/train_throughput.py [--epochs 3] [--write]

--write replaces the "Train throughput" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, ensure_processed, machine, run_stage, training_report, workspace_with
from floor import bare_loop
from report import replace_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    processed = ensure_processed(REPO / "data" / "processed")
    floor = bare_loop(processed, epochs=args.epochs)
    rows = [("bare PyTorch loop (floor), 2 threads", floor["epoch_s"], floor["samples_per_s"],
             1.0, None, None)]
    print(f"floor: {floor['epoch_s']:.2f} s/epoch, {floor['samples_per_s']:.0f} samples/s",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            ws = workspace_with(processed, Path(tmp) / f"w{workers}")
            wall, _ = run_stage(ws, "train", f"train.num_workers={workers}",
                                f"train.epochs={args.epochs}")
            report = training_report(ws)
            times = sorted(e["epoch_time_s"] for e in report["epochs"])
            epoch_s = times[len(times) // 2]
            overhead = wall - sum(times)
            ratio = report["samples_per_s"] / floor["samples_per_s"]
            rows.append((f"dltrain train, {workers} worker(s)", epoch_s,
                         report["samples_per_s"], ratio, overhead, wall))
            print(f"{workers} worker(s): {epoch_s:.2f} s/epoch, ratio {ratio:.2f}, "
                  f"overhead {overhead:.1f} s (wall {wall:.1f} s)", flush=True)

    best = max(r[3] for r in rows[1:])
    lines = ["| setting | epoch (s, median) | samples/s | ratio to floor | Ray overhead (s) "
             "| stage wall (s) |", "|---|---|---|---|---|---|"]
    for name, epoch_s, sps, ratio, overhead, wall in rows:
        lines.append(f"| {name} | {epoch_s:.2f} | {sps:.0f} | {ratio:.2f} | "
                     f"{'' if overhead is None else f'{overhead:.1f}'} | "
                     f"{'' if wall is None else f'{wall:.1f}'} |")
    verdict = (f"Targets: better setting >= 0.90 of the floor (got {best:.2f}); 2-worker DDP "
               f">= 0.70 (got {rows[2][3]:.2f}); overhead <= 10 s "
               f"(got {min(r[4] for r in rows[1:]):.1f} / {max(r[4] for r in rows[1:]):.1f}).")
    table = "\n".join(lines)
    print(table)
    print(verdict)
    if args.write:
        body = (f"Machine: {machine()}. Fashion-MNIST, {floor['n']} training samples, "
                f"{args.epochs} epochs each, global batch 128, RMSprop.\n\n"
                f"Command: `.venv/bin/python bench/train_throughput.py --epochs {args.epochs} "
                f"--write`\n\n{table}\n\n{verdict}\n")
        replace_section(REPO / "BENCHMARKS.md", "Train throughput", body)


if __name__ == "__main__":
    main()
