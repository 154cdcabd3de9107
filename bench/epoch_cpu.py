"""Where the CPU goes during the epochs of a 1-worker `dltrain train` run on Ray.

Runs `dltrain train` on Fashion-MNIST (a private Ray, `train.ray_address=local`, or the warm Ray
of `make ray-up`) and samples /proc twice a second: the CPU time of every process and thread of
the run (the driver and what it starts; on the warm Ray, every process of that head). The
window is from the driver's "epoch 1/N" line to its "epoch N/N" line (epochs 2..N: the first
epoch's warm-up is left out). For each process: its CPU seconds per epoch and its share of the
machine's CPUs over the window; the training worker's threads are listed one by one.

    .venv/bin/python bench/epoch_cpu.py [--epochs 5] [--ray cold|warm] [--repeats 1]
                                        [-S train.key=value ...] [--env KEY=VALUE ...]
                                        [--py-spy OUT_DIR]

--py-spy also records the worker and the driver with py-spy (pip's `py-spy`, the dev extra)
over the window, and prints each one's busiest functions (own samples). Nothing is written to
BENCHMARKS.md: the figures go there by hand, beside the throughput they explain.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, REPO, ensure_processed, env, warm_ray, workspace_with

TICK = os.sysconf("SC_CLK_TCK")
CPUS = len(os.sched_getaffinity(0))
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\s")


def _stat(path: str) -> list[str] | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields after it start past the last ')'.
    return text[text.rindex(")") + 2:].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def label(pid: int, driver: int, cmdline: str) -> str:
    """What a process of the run is, in the words of `ps`."""
    if pid == driver:
        return "driver (dltrain train)"
    if cmdline.startswith("ray::"):
        return cmdline.split()[0].split(".")[0]  # ray::RayTrainWorker, ray::TrainController
    program = Path(cmdline.split()[0]).name if cmdline else ""
    if program in ("raylet", "gcs_server"):  # the raylet's arguments name default_worker.py
        return program
    for needle, name in (("default_worker.py", "ray::IDLE"),
                         ("dashboard/agent.py", "dashboard agent"),
                         ("dashboard/dashboard.py", "dashboard"),
                         ("runtime_env/agent", "runtime env agent"),
                         ("log_monitor.py", "log monitor"), ("monitor.py", "autoscaler monitor"),
                         ("ray start", "ray start")):
        if needle in cmdline:
            return name
    return Path(cmdline.split()[0]).name if cmdline else "?"


class Sampler:
    """CPU ticks of every thread of the run's processes, sampled every `every_s`."""

    def __init__(self, driver: int, session: int | None, every_s: float = 0.5) -> None:
        self.driver, self.session, self.every_s = driver, session, every_s
        self.ticks: dict[tuple[int, int], int] = {}  # (pid, tid) -> utime + stime
        self.names: dict[int, str] = {}
        self.thread_names: dict[tuple[int, int], str] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _members(self) -> list[int]:
        children = collections.defaultdict(list)
        session_members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            fields = _stat(f"/proc/{entry}/stat")
            if fields is None:
                continue
            children[int(fields[1])].append(int(entry))
            if self.session is not None and int(fields[3]) == self.session:
                session_members.append(int(entry))
        tree, todo = [], [self.driver, *session_members]
        while todo:
            pid = todo.pop()
            if pid not in tree:
                tree.append(pid)
                todo.extend(children.get(pid, []))
        return tree

    def sample(self) -> dict[tuple[int, int], int]:
        snapshot = {}
        for pid in self._members():
            # A worker process names itself (ray::RayTrainWorker) once it runs an actor.
            if not self.names.get(pid, "").startswith("ray::") or self.names[pid] == "ray::IDLE":
                self.names[pid] = label(pid, self.driver, _cmdline(pid))
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    fields = _stat(f"/proc/{pid}/task/{tid}/stat")
                    if fields is not None:
                        snapshot[(pid, int(tid))] = int(fields[11]) + int(fields[12])
                        if (pid, int(tid)) not in self.thread_names:
                            with contextlib.suppress(OSError):
                                self.thread_names[(pid, int(tid))] = Path(
                                    f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        with self._lock:
            self.ticks.update(snapshot)
            return dict(self.ticks)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_once(ws: Path, epochs: int, address: str, overrides: list[str],
             extra_env: dict[str, str], session: int | None,
             py_spy: Path | None) -> dict:
    args = [str(BIN / "dltrain"), "train", "--workspace", str(ws), "-S", f"train.epochs={epochs}",
            "-S", f"train.ray_address={address}", "-S", "train.num_workers=1"]
    for o in overrides:
        args += ["-S", o]
    started = time.perf_counter()
    proc = subprocess.Popen(args, env={**env(), **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid, session).start()
    marks: dict[int, tuple[float, dict]] = {}
    epoch_s: list[float] = []
    spies: list[subprocess.Popen] = []
    output = []
    for line in proc.stdout:
        output.append(line)
        found = EPOCH_LINE.match(line)
        if not found:
            continue
        epoch_s.append(float(line.split()[-1].rstrip("s")))
        epoch = int(found[1])
        if epoch in (1, epochs):
            marks[epoch] = (time.perf_counter(), sampler.sample())
        if epoch == 1 and py_spy is not None:
            spies = start_py_spy(sampler, py_spy, proc.pid)
    sampler.stop()
    for spy in spies:
        spy.terminate()
        spy.wait()
    wall = time.perf_counter() - started
    if proc.wait() or len(marks) < 2:
        raise SystemExit(f"{' '.join(args)} failed:\n{''.join(output)}")
    (t0, before), (t1, after) = marks[1], marks[epochs]
    return {"window_s": t1 - t0, "epochs": epochs - 1, "before": before, "after": after,
            "names": sampler.names, "thread_names": sampler.thread_names, "wall_s": wall,
            "epoch_s": epoch_s}


def start_py_spy(sampler: Sampler, out_dir: Path, driver: int) -> list[subprocess.Popen]:
    """py-spy record of the worker and the driver, raw (collapsed) stacks, until stopped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy", path=str(BIN)) or "py-spy"
    targets = {"driver": driver}
    for pid, name in sampler.names.items():
        if name in ("ray::RayTrainWorker", "ray::TrainController"):
            targets[name.removeprefix("ray::")] = pid
    return [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "50", "--threads",
                              "--nonblocking", "--format", "raw", "--output",
                              str(out_dir / f"{what}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for what, pid in targets.items()]


def busiest(raw: Path, top: int = 8) -> list[tuple[str, int]]:
    """The functions with the most own samples in a py-spy raw profile (thread, then frame)."""
    own: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        own[f"{frames[0]} :: {frames[-1]}"] += int(count)
    return own.most_common(top)


def table(run: dict) -> str:
    window, epochs = run["window_s"], run["epochs"]
    per_process: collections.Counter[str] = collections.Counter()
    per_thread: collections.Counter[tuple[str, str]] = collections.Counter()
    for key, ticks in run["after"].items():
        delta = (ticks - run["before"].get(key, 0)) / TICK
        if delta <= 0:
            continue
        name = run["names"].get(key[0], "?")
        per_process[name] += delta
        if name in ("ray::RayTrainWorker", "driver (dltrain train)"):
            per_thread[(name, run["thread_names"].get(key, "?"))] += delta
    total = sum(per_process.values())
    lines = [f"window: epochs 2-{epochs + 1}, {window:.1f} s wall, {total:.1f} CPU-s of the "
             f"run's processes ({CPUS} CPUs: {CPUS * window:.1f} CPU-s available)",
             "| process | CPU s per epoch | share of the machine | share of the run's CPU |",
             "|---|---|---|---|"]
    for name, cpu in per_process.most_common():
        if cpu / epochs < 0.005:
            continue
        lines.append(f"| {name} | {cpu / epochs:.3f} | {100 * cpu / (CPUS * window):.1f} % | "
                     f"{100 * cpu / total:.1f} % |")
    lines.append("\nthreads of the worker and the driver (comm name: CPU s per epoch):")
    for (name, thread), cpu in per_thread.most_common(12):
        if cpu / epochs >= 0.005:
            lines.append(f"  {name} / {thread}: {cpu / epochs:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--ray", choices=["cold", "warm"], default="cold")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("-S", dest="overrides", action="append", default=[])
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the run")
    parser.add_argument("--py-spy", type=Path, help="record py-spy profiles into this folder")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    processed = ensure_processed(REPO / "data" / "processed")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        session = None
        if args.ray == "warm":
            extra.update(stack.enter_context(warm_ray(tmp / "ray")))
            import json

            state = json.loads((tmp / "ray" / "cluster.json").read_text())
            session = state["nodes"][0]["pgid"]
        ws = workspace_with(processed, tmp / "ws")
        for round_ in range(args.repeats):
            shutil.rmtree(ws / ".ray_results", ignore_errors=True)
            run = run_once(ws, args.epochs, "auto" if args.ray == "warm" else "local",
                           args.overrides, extra, session, args.py_spy)
            print(f"round {round_ + 1} ({args.ray} Ray, load {os.getloadavg()[0]:.1f}): "
                  f"epochs {', '.join(f'{s:.2f}' for s in run['epoch_s'])} s; wall "
                  f"{run['wall_s']:.1f} s")
            print(table(run), flush=True)
    if args.py_spy:
        for raw in sorted(args.py_spy.glob("*.txt")):
            print(f"\npy-spy, {raw.stem}: own samples (50 a second)")
            for frame, count in busiest(raw):
                print(f"  {count:6d}  {frame}")


if __name__ == "__main__":
    main()
