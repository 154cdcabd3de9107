"""Run a stage's command so that it cannot outlive the flow run that started it.

    python flows/stage_guard.py --parent <pid> [--grace 15] -- dvc repro --single-item train

flows/dvc_stage.py starts every `dvc repro` through this guard. Without it, a flow-run process
that dies (its worker SIGKILLed, the OOM killer) would leave the stage running, orphaned: dvc,
the `dltrain train` it runs and Ray's processes would train on and keep DVC's lock on the
stage's outputs, so that a re-run fails as "busy" until they end. The guard notices that its
parent is gone (PR_SET_PDEATHSIG on Linux; a poll of the parent pid everywhere) and stops the
stage as Ctrl-C in a terminal would:

1. SIGINT to the command's process group: DVC releases its locks and leaves dvc.lock as it
   was; `dltrain train` aborts its Ray Train run and shuts its local Ray down;
2. SIGKILL to that group if it has not exited after the grace period;
3. SIGTERM, then SIGKILL, to any descendant still alive: Ray starts its workers in sessions of
   their own, out of reach of a group signal. On Linux the guard is their subreaper, so it
   finds them even after the raylet that started them is gone.

A SIGINT, SIGTERM or SIGHUP to the guard itself (the flow's timeout, a cancellation) stops the
stage the same way. Otherwise the guard waits for the command and exits with its status.
Standard library and psutil only (psutil comes with DVC), so it starts in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable

import psutil

POLL_S = 0.2
DEFAULT_GRACE_S = 15.0
# After the grace period, how long a SIGKILLed group or a SIGTERMed straggler gets to go.
_KILL_WAIT_S = 5.0
# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """prctl(2) on Linux; False where it is missing or refused (the poll still works)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _say(message: str) -> None:
    """One line on stderr, which is the flow's log while the flow run lives; once it is gone
    the pipe is broken, and the line is lost, not an error."""
    try:
        print(f"stage guard: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _descendants() -> set[psutil.Process]:
    try:
        return set(psutil.Process().children(recursive=True))
    except psutil.Error:
        return set()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone (a PermissionError on macOS for a group of zombies)


class Guard:
    """The command as a child in a session of its own, and what stops it."""

    def __init__(self, cmd: list[str], parent: int, grace_s: float) -> None:
        self.cmd, self.parent, self.grace_s = cmd, parent, grace_s
        self.child: subprocess.Popen[bytes] | None = None
        self.signalled: str | None = None
        self._pause = 0.002

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signalled = self.signalled or signal.Signals(signum).name

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        # The kernel's notice comes as a SIGTERM the moment the parent dies; set before the
        # first check of the parent, so that a parent that died in between is seen too.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        # A session of its own: a signal to the command's group does not reach the guard.
        self.child = subprocess.Popen(self.cmd, start_new_session=True)
        while self._wait_child(POLL_S) is None:
            reason = self._stop_reason()
            if reason:
                _say(f"{reason}; stopping `{' '.join(self.cmd[:4])}` (SIGINT, then SIGKILL "
                     f"after {self.grace_s:g} s)")
                self.stop()
                break
        # Adopted orphans (a subreaper's); without a subreaper the list is empty here.
        self._kill_stragglers(_descendants())
        code = self.child.returncode
        if code is None:  # not even SIGKILL ended it (uninterruptible I/O): say so
            _say(f"`{' '.join(self.cmd[:4])}` (pid {self.child.pid}) did not exit")
            return 1
        return 128 - code if code < 0 else code

    def _stop_reason(self) -> str | None:
        if os.getppid() != self.parent:
            return f"the flow run that started this stage (pid {self.parent}) is gone"
        if self.signalled:
            return f"received {self.signalled}"
        return None

    def _wait_child(self, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for the command, reaping adopted orphans meanwhile (as a
        subreaper the guard inherits Ray's workers once their raylet is gone)."""
        assert self.child is not None
        deadline = time.monotonic() + timeout_s
        while True:
            self._reap()
            left = deadline - time.monotonic()
            if self.child.returncode is not None or left <= 0:
                return self.child.returncode
            # Short first, then every 0.1 s: a quick command is reaped at once, a long one
            # costs ten cheap waitpid calls a second.
            time.sleep(min(self._pause, left))
            self._pause = min(2 * self._pause, 0.1)

    def _reap(self) -> None:
        """Collect every exited child: the command (keeping its status) and adopted orphans.
        A waitpid per exited child, not a scan of /proc: the guard runs for hours of
        training and must cost nothing meanwhile."""
        assert self.child is not None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child.pid:
                self.child.returncode = os.waitstatus_to_exitcode(status)

    def stop(self) -> None:
        """SIGINT the command's group, SIGKILL it after the grace period, then every
        descendant known before or found after."""
        assert self.child is not None
        # Taken first: without a subreaper (not Linux), Ray's workers cannot be found once
        # the processes between them and the guard have exited.
        before = _descendants()
        _signal_group(self.child.pid, signal.SIGINT)
        if self._wait_child(self.grace_s) is None:
            _signal_group(self.child.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.child.kill()  # also if it has left its process group
            self._wait_child(_KILL_WAIT_S)
        self._kill_stragglers(before | _descendants())

    def _kill_stragglers(self, procs: Iterable[psutil.Process]) -> None:
        left = [p for p in procs if _alive(p)]
        for sig, wait_s in ((signal.SIGTERM, _KILL_WAIT_S), (signal.SIGKILL, _KILL_WAIT_S)):
            for proc in left:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = time.monotonic() + wait_s
            while left and time.monotonic() < deadline:
                self._reap()
                left = [p for p in left if _alive(p)]
                time.sleep(0.05)
            if not left:
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a command; stop its whole tree when "
                                     "the parent process dies or the guard is signalled.")
    parser.add_argument("--parent", type=int, default=None,
                        help="the pid whose death stops the command (default: our parent)")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds between SIGINT and SIGKILL (default %(default)s)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command and its args")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given (put it after --)")
    parent = args.parent if args.parent is not None else os.getppid()
    return Guard(cmd, parent, args.grace).run()


if __name__ == "__main__":
    sys.exit(main())
