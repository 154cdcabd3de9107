"""The Prefect flow's own overhead: a flow run's wall time minus the same stages' under
`dvc repro`, against a running Prefect server (target: <= 10 s).

    .venv/bin/python bench/flow_overhead.py [--write]        # starts a throw-away local stack
    .venv/bin/python bench/flow_overhead.py --api-url http://127.0.0.1:4200/api

Two fresh clones of this working tree, the same tiny synthetic data and params (1 epoch, 1
worker): clone A runs `dvc repro`, clone B runs the flow (`python -c 'mnist_training(...)'`,
reporting to the server). Both are timed cold (every stage runs) and warm (nothing changed:
every stage skipped, `--repeats` times). Each is a fresh process, so both include their
interpreter's start-up: what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from flows.workspace import render_overrides  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "bench"))
from common import clone_worktree, machine, synthetic_raw  # noqa: E402
from report import replace_section  # noqa: E402

PARAMS = {"train.epochs": 1, "train.num_workers": 1}


def _env(api_url: str) -> dict[str, str]:
    env = dict(os.environ, PREFECT_API_URL=api_url)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def dvc_repro(clone: Path, env: dict[str, str]) -> float:
    return _timed([str(Path(sys.executable).parent / "dvc"), "repro"], clone, env)


def flow_run(clone: Path, env: dict[str, str], source: str) -> float:
    overrides = {"data.source": source}
    code = ("import json, sys; from flows.mnist_training import mnist_training; "
            f"r = mnist_training(epochs=1, num_workers=1, overrides={overrides!r}, "
            f"workspace={str(clone)!r}); print(json.dumps(r))")
    return _timed([sys.executable, "-c", code], clone, env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stack(command: str, home: Path, port: int) -> None:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(port))
    subprocess.run([sys.executable, str(REPO_ROOT / "infra/prefect/stack.py"), command],
                   env=env, check=True)


def measure(api_url: str, root: Path, repeats: int) -> dict[str, list[float]]:
    source = synthetic_raw(root / "source").as_uri()
    a, b = clone_worktree(root / "dvc"), clone_worktree(root / "flow")
    params = a / "params.yaml"
    params.write_text(render_overrides(params.read_text(), {"data.source": source, **PARAMS}))
    env = _env(api_url)
    times: dict[str, list[float]] = {"dvc cold": [], "flow cold": [], "dvc warm": [],
                                     "flow warm": []}
    times["dvc cold"].append(dvc_repro(a, env))
    times["flow cold"].append(flow_run(b, env, source))
    for _ in range(repeats):  # interleaved, so that load from others hits both alike
        times["dvc warm"].append(dvc_repro(a, env))
        times["flow warm"].append(flow_run(b, env, source))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api-url", help="a running Prefect server's API (default: start one)")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs of each (default 3)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dltrain-bench-") as tmp:
        root = Path(tmp)
        home, port = root / "prefect-home", _free_port()
        api_url = args.api_url or f"http://127.0.0.1:{port}/api"
        if not args.api_url:
            _stack("up", home, port)
        try:
            times = measure(api_url, root, args.repeats)
        finally:
            if not args.api_url:
                _stack("down", home, port)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'':<10}{'median s':>10}  runs")
    for key, values in times.items():
        print(f"{key:<10}{med[key]:>10.1f}  {', '.join(f'{v:.1f}' for v in values)}")
    cold, warm = med["flow cold"] - med["dvc cold"], med["flow warm"] - med["dvc warm"]
    print(f"\nflow overhead, every stage runs:    {cold:+.1f} s (target <= 10 s)")
    print(f"flow overhead, every stage skipped: {warm:+.1f} s (target <= 10 s)")
    print(json.dumps({"overhead_cold_s": round(cold, 2), "overhead_warm_s": round(warm, 2),
                      "runs": {k: [round(x, 2) for x in v] for k, v in times.items()}}))
    if args.write:
        replace_section(REPO_ROOT / "BENCHMARKS.md", "Prefect flow overhead",
                        report(times, med, cold, warm, args.repeats))
    return 0


def report(times: dict[str, list[float]], med: dict[str, float], cold: float, warm: float,
           repeats: int) -> str:
    rows = [("`dvc repro`, every stage runs", "dvc cold"), ("flow run, every stage runs",
            "flow cold"), ("`dvc repro`, nothing changed", "dvc warm"),
            ("flow run, nothing changed", "flow warm")]
    lines = [f"Machine: {machine()}.", "",
             f"Command: `.venv/bin/python bench/flow_overhead.py --repeats {repeats} --write` (a "
             "throw-away local Prefect server and worker on loopback; two fresh clones, tiny "
             "synthetic data, 1 epoch, 1 worker).", "",
             "| run | median (s) | runs (s) |", "|---|---|---|"]
    lines += [f"| {label} | {med[key]:.1f} | {', '.join(f'{v:.1f}' for v in times[key])} |"
              for label, key in rows]
    met = "met" if max(cold, warm) <= 10 else "not met"
    lines += ["", f"Flow overhead (flow run minus `dvc repro`): **{cold:+.1f} s** when every "
              f"stage runs, **{warm:+.1f} s** when every stage is skipped; target <= 10 s "
              f"against a running server: {met}."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
