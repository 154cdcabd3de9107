"""Run one DVC stage as a subprocess, stream its output to a logger, report what DVC did.

The flow's tasks call this, so a flow run and `dvc repro` share one cache and one dvc.lock:
DVC itself decides whether a stage runs, is skipped (nothing changed) or is restored from its
run cache. The verdict is read from DVC's documented, machine-readable outputs only, never
from its console wording (which changes between releases):

- skipped: `dvc status --json <stage>` reports nothing for the stage (`{}`), so `dvc repro`
  would do nothing either; it is not started. A stage that always runs (the freshness check,
  `always_changed` in dvc.yaml) is started without asking.
- ran or restored: `dvc repro --single-item <stage>` exits 0 either way. The stage's command
  (`dltrain <stage>`) appends its name to the file named by DLTRAIN_STAGE_RAN_FILE when it
  starts (dltrain/cli.py), so a non-empty file means it ran, an empty one that DVC checked
  its outputs out of the run cache instead. A diff of the stage's dvc.lock entry cannot tell
  the two apart: a stage whose outputs were deleted is restored (or, with an output that is
  not cached, run again) with its dvc.lock entry unchanged.
- failed: a non-zero exit; the message quotes the stage command's own one-line error
  (`dltrain <stage>: error: ...`) when it printed one, else the last line DVC wrote to stderr
  (DVC logs warnings and errors there, and its verdict on the failure last). A repo locked by
  another DVC process gets this message too: its exit status does not tell that case apart,
  and a second flow run is stopped earlier by the flow's own workspace lock
  (flows/workspace.py) and, for a deployment, queued by its concurrency limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import psutil

from dltrain.cli import STAGE_RAN_FILE_ENV
from dltrain.errors import DltrainError
from dltrain.registry.history import FLOW_RUN_ID_ENV

Outcome = Literal["ran", "skipped", "restored"]

# DVC's advice after a stage (git add, autostage, dvc push): noise in a flow's log. It only
# filters what is logged; no outcome is decided from DVC's wording.
_HINTS = ("To track the changes with git", "git add ", "To enable auto staging",
          "dvc config core.autostage", "Use `dvc push`")

# The one line `dltrain <stage>` prints for an error of its own (dltrain/cli.py); DVC's own
# last line ("failed to reproduce ...: exited with 2") names the stage but not the cause.
_CAUSE = re.compile(r"^dltrain [\w-]+: error: ")

# After a timeout: SIGINT first (DVC then releases its locks and leaves dvc.lock as it was),
# SIGKILL if the stage has not stopped after this grace period (flows/stage_guard.py does both).
_GRACE_S = 15.0
GUARD = Path(__file__).with_name("stage_guard.py")


class StageFailedError(DltrainError):
    """`dvc status` or `dvc repro` of one stage exited non-zero or timed out."""


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
    from prefect.runtime import flow_run  # recorded with each alias move (dltrain.registry.history)
    env[FLOW_RUN_ID_ENV] = str(flow_run.id or "")
    return env


def _pump(stream: IO[bytes], name: str, lines: queue.Queue[tuple[str, str | None]]) -> None:
    """Read the child's `name` stream into `lines`, one (name, line) entry per line, then
    (name, None) at its end. A progress bar rewrites its line with carriage returns; only its
    final state is kept, so the log is not flooded."""
    buffer = b""
    while chunk := stream.read1(65536):  # type: ignore[attr-defined]
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            text = raw.decode(errors="replace").rstrip("\r").rsplit("\r", 1)[-1].rstrip()
            if text:
                lines.put((name, text))
    tail = buffer.decode(errors="replace").rsplit("\r", 1)[-1].rstrip()
    if tail:
        lines.put((name, tail))
    lines.put((name, None))


def _stop(guard: subprocess.Popen[bytes]) -> None:
    """Stop the stage and everything it started: the guard does it on SIGINT (SIGINT to the
    stage's group, SIGKILL after the grace period, then Ray's workers); an unguarded dvc stops
    on SIGINT itself. Should either hang, it and every process under it are killed."""
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




class _DeadlinePassed(Exception):
    """A dvc command was stopped at the stage's deadline."""


def _dvc(args: list[str], workspace: Path, deadline: float | None,
         on_line: Callable[[str, str], None], env: dict[str, str],
         guard: bool = True) -> tuple[int, str | None]:
    """`dvc <args>` in `workspace`, each line of its output passed to `on_line(stream, line)`
    ("out" or "err") as it comes; stopped at `deadline`. Returns its exit status and the
    cause: the stage command's own one-line error if it printed one, else the last line
    written to stderr."""
    # Under the guard, in a session of its own: a timeout, a cancelled flow run, or the death
    # of this process stops the whole stage (dvc, the `dltrain` it runs, Ray's workers), not
    # only dvc; and no group signal meant for the flow run reaches the stage unguarded.
    # `guard=False` is for a short command that starts nothing: the guard's own start-up
    # (about 0.4 s) would double the cost of a skipped stage.
    cmd = [dvc_executable(), *args]
    proc = subprocess.Popen(guarded(cmd) if guard else cmd, cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    for name, stream in (("out", proc.stdout), ("err", proc.stderr)):
        threading.Thread(target=_pump, args=(stream, name, lines), daemon=True).start()
    last_error = cause = None
    open_streams = 2
    try:
        while open_streams:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                name, line = lines.get(timeout=wait)
            except queue.Empty:
                raise _DeadlinePassed from None
            if line is None:
                open_streams -= 1
                continue
            if name == "err":
                last_error = line
                if _CAUSE.match(line):
                    cause = line
            on_line(name, line)
        returncode = proc.wait()
    finally:
        _stop(proc)
    return returncode, cause or last_error


def _failure(stage: str, command: str, returncode: int, last_error: str | None) -> str:
    return (f"stage {stage!r} failed (dvc {command} exited {returncode}): "
            f"{last_error or 'no error output'}")


def unchanged(stage: str, workspace: Path, deadline: float | None = None) -> bool:
    """True if `dvc status --json <stage>` reports nothing for `stage` (without --with-deps it
    checks that stage alone): `dvc repro` would skip it. Raises StageFailedError if dvc status
    fails (an unknown stage, a locked repo: the message quotes DVC's error)."""
    return not changed_stages([stage], workspace, deadline)


def changed_stages(stages: list[str], workspace: Path,
                   deadline: float | None = None) -> list[str]:
    """The stages among `stages` that `dvc status --json` reports (each checked alone, as by
    `unchanged`), in the order given: one dvc process for all of them."""
    out: list[str] = []
    label = ", ".join(stages)

    def keep_json(name: str, line: str) -> None:
        if name == "out":
            out.append(line)

    returncode, last_error = _dvc(["status", "--json", *stages], workspace, deadline,
                                  keep_json, stage_env(), guard=False)
    if returncode != 0:
        raise StageFailedError(_failure(label, "status", returncode, last_error))
    try:
        status = json.loads("\n".join(out))
    except json.JSONDecodeError:
        raise StageFailedError(f"stage {label!r}: `dvc status --json` printed no JSON "
                               f"(it printed {' '.join(out)[:200]!r})") from None
    # Keys are stage names; a stage of another dvc.yaml would be `path/dvc.yaml:name`.
    reported = {str(key).rsplit(":", 1)[-1] for key in status}
    return [stage for stage in stages if stage in reported]


def run_stage(stage: str, workspace: Path, logger: logging.Logger | logging.LoggerAdapter,
              timeout_s: float | None = None, always_runs: bool = False) -> StageResult:
    """`dvc repro --single-item <stage>` in `workspace` unless DVC finds the stage unchanged
    (not asked when the stage `always_runs`), its output streamed line by line to `logger`.
    Raises StageFailedError naming the stage and the cause."""
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    try:
        outcome = _reproduce(stage, workspace, logger, deadline, always_runs)
    except _DeadlinePassed:
        raise StageFailedError(
            f"stage {stage!r} did not finish within its timeout of {timeout_s:.0f} s; "
            "it was stopped (dvc.lock keeps its last completed state)") from None
    duration = time.monotonic() - start
    logger.info("stage %s: %s in %.1f s", stage, outcome, duration)
    return StageResult(stage=stage, outcome=outcome, duration_s=round(duration, 3))


def _reproduce(stage: str, workspace: Path, logger: logging.Logger | logging.LoggerAdapter,
               deadline: float | None, always_runs: bool) -> Outcome:
    if not always_runs and unchanged(stage, workspace, deadline):
        return "skipped"

    def log(_: str, line: str) -> None:
        if not line.lstrip().startswith(_HINTS):
            logger.info("%s", line)

    fd, ran_file = tempfile.mkstemp(prefix=f"dltrain-{stage}-", suffix=".ran")
    os.close(fd)
    try:
        cmd = ["repro", "--single-item", stage]
        logger.info("$ dvc %s  (in %s)", " ".join(cmd), workspace)
        returncode, last_error = _dvc(cmd, workspace, deadline, log,
                                      {**stage_env(), STAGE_RAN_FILE_ENV: ran_file})
        if returncode != 0:
            raise StageFailedError(_failure(stage, "repro", returncode, last_error))
        # Written by `dltrain <stage>` as it starts; DVC restoring from its run cache does not
        # start it.
        return "ran" if Path(ran_file).stat().st_size else "restored"
    finally:
        Path(ran_file).unlink(missing_ok=True)
