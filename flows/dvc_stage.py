"""Run one DVC stage as a subprocess, stream its output to a logger, report what DVC did.

The flow's tasks call this, so a flow run and `dvc repro` share one cache and one dvc.lock:
DVC itself decides whether a stage runs, is skipped (nothing changed) or is restored from its
run cache, and we only read its verdict from its output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import psutil

from dltrain.errors import DltrainError

Outcome = Literal["ran", "skipped", "restored"]

# DVC 3.67's own messages (dvc/stage/__init__.py, dvc/stage/cache.py, dvc/stage/run.py,
# dvc/lock.py): the verdict is read from them because `dvc repro` has no machine-readable one.
_SKIPPED = re.compile(r"Stage '(?P<stage>[^']+)' didn't change, skipping")
_RESTORED = re.compile(r"Stage '(?P<stage>[^']+)' is cached - skipping run")
_RAN = re.compile(r"Running stage '(?P<stage>[^']+)'")
_DVC_LOCKED = "Unable to acquire lock"
# DVC's advice after a stage (git add, autostage, dvc push): noise in a flow's log.
_HINTS = ("To track the changes with git", "git add ", "To enable auto staging",
          "dvc config core.autostage", "Use `dvc push`")

# After a timeout: SIGINT first (DVC then releases its locks and leaves dvc.lock as it was),
# SIGKILL if the stage has not stopped after this grace period (flows/stage_guard.py does both).
_GRACE_S = 15.0
GUARD = Path(__file__).with_name("stage_guard.py")


class StageFailedError(DltrainError):
    """`dvc repro` of one stage exited non-zero, timed out, or found the repo locked."""


@dataclass(frozen=True)
class StageResult:
    stage: str
    outcome: Outcome
    duration_s: float


def dvc_executable() -> str:
    """The dvc next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "dvc"
    if beside.exists():
        return str(beside)
    found = shutil.which("dvc")
    if found is None:
        raise StageFailedError("dvc is not installed: run `make setup` (it installs the venv)")
    return found


def stage_env() -> dict[str, str]:
    """The stage's environment: the venv's bin first on PATH, because dvc.yaml's commands call
    `dltrain`; unbuffered Python so that each line reaches the log when it is printed."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_outcome(stage: str, lines: list[str]) -> Outcome | None:
    """What DVC did with `stage`, from its output; None if it said nothing we know."""
    for pattern, outcome in ((_RAN, "ran"), (_RESTORED, "restored"), (_SKIPPED, "skipped")):
        if any((m := pattern.search(line)) and m["stage"] == stage for line in lines):
            return outcome  # type: ignore[return-value]
    return None


def _pump(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    """Read the child's output into `lines`, one entry per line. A progress bar rewrites its
    line with carriage returns; only its final state is kept, so the log is not flooded."""
    buffer = b""
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            text = raw.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1].rstrip()
            if text:
                lines.put(text)
    tail = buffer.decode(errors="replace").rsplit("\r", 1)[-1].rstrip()
    if tail:
        lines.put(tail)
    lines.put(None)


def _stop(guard: subprocess.Popen[bytes]) -> None:
    """Stop the stage and everything it started: the guard does it on SIGINT (SIGINT to the
    stage's group, SIGKILL after the grace period, then Ray's workers). Should the guard
    itself hang, it and every process under it are killed."""
    if guard.poll() is not None:
        return
    try:
        guard.send_signal(signal.SIGINT)
        guard.wait(timeout=_GRACE_S + 10.0)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        tree = [psutil.Process(guard.pid), *psutil.Process(guard.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    guard.wait()


def guarded(cmd: list[str]) -> list[str]:
    """`cmd` under flows/stage_guard.py, which stops it should this process die."""
    return [sys.executable, str(GUARD), "--parent", str(os.getpid()), "--grace",
            str(_GRACE_S), "--", *cmd]


def unchanged(stage: str, workspace: Path) -> bool:
    """True if DVC's own check (Stage.changed, what `dvc repro` skips a stage by) finds nothing
    changed, run in-process under DVC's repo lock: a skipped stage then costs no dvc start-up
    (1-2 s each). Any doubt answers False, and `dvc repro` decides and reports."""
    try:
        from dvc.repo import Repo

        with Repo(str(workspace)) as repo, repo.lock:
            # An absolute target: DVC resolves relative ones against the cwd, not the repo.
            (found,) = repo.stage.collect(f"{workspace / 'dvc.yaml'}:{stage}")
            return not found.changed()
    except Exception:  # noqa: BLE001  (locked, missing stage, ...: the subprocess will say)
        return False


def run_stage(stage: str, workspace: Path, logger: logging.Logger | logging.LoggerAdapter,
              timeout_s: float | None = None) -> StageResult:
    """`dvc repro --single-item <stage>` in `workspace`, its output streamed line by line to
    `logger`. Raises StageFailedError naming the stage and the cause."""
    start = time.monotonic()
    if unchanged(stage, workspace):
        logger.info("Stage '%s' didn't change, skipping", stage)
        return StageResult(stage=stage, outcome="skipped",
                           duration_s=round(time.monotonic() - start, 3))
    cmd = [dvc_executable(), "repro", "--single-item", stage]
    logger.info("$ %s  (in %s)", " ".join(["dvc", *cmd[1:]]), workspace)
    deadline = None if timeout_s is None else start + timeout_s
    seen: list[str] = []
    # Under the guard, in a session of its own: a timeout, a cancelled flow run, or the death
    # of this process stops the whole stage (dvc, the `dltrain` it runs, Ray's workers), not
    # only dvc; and no group signal meant for the flow run reaches the stage unguarded.
    proc = subprocess.Popen(guarded(cmd), cwd=workspace, env=stage_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                raise StageFailedError(
                    f"stage {stage!r} did not finish within its timeout of {timeout_s:.0f} s; "
                    "it was stopped (dvc.lock keeps its last completed state)") from None
            if line is None:
                break
            seen.append(line)
            if not line.lstrip().startswith(_HINTS):
                logger.info("%s", line)
        returncode = proc.wait()
    finally:
        _stop(proc)
    duration = time.monotonic() - start
    if returncode != 0:
        raise StageFailedError(_failure_message(stage, returncode, seen, workspace))
    outcome = parse_outcome(stage, seen)
    if outcome is None:
        raise StageFailedError(
            f"dvc repro {stage!r} exited 0 but did not say whether it ran the stage; is "
            f"{stage!r} a stage of {workspace / 'dvc.yaml'}?")
    logger.info("stage %s: %s in %.1f s", stage, outcome, duration)
    return StageResult(stage=stage, outcome=outcome, duration_s=round(duration, 3))


def _failure_message(stage: str, returncode: int, seen: list[str], workspace: Path) -> str:
    if any(_DVC_LOCKED in line for line in seen):
        return (f"stage {stage!r}: another DVC process (a `dvc repro`, `dvc exp` or a second "
                f"flow run) holds the lock of the DVC repo {workspace}; wait for it to finish "
                "and run again")
    errors = [line for line in seen if "ERROR" in line or "error:" in line]
    last = errors[-1] if errors else (seen[-1] if seen else "no output")
    return f"stage {stage!r} failed (dvc repro exited {returncode}): {last}"
