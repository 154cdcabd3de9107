"""Live tracking from a process of its own, for Ray Train's local mode (train.num_workers 0).

In local mode the training runs in the stage's own interpreter: a thread that imports MLflow
and opens the run (dltrain.train.live) would hold Python's global lock for seconds, one piece
after another with PyTorch's import and the first steps. A child process does the same work
(the same LiveRun, on its own interpreter and core) while this process imports PyTorch and
trains. It is started first, and reads the epoch log in the run directory as the thread does.

The two talk in JSON lines: the child's stdin takes the run's description, then one command
(finish with the run's epochs, or abort with a status); its stdout gives the lines for the
user ("say"), "opened" once the first attempt to open the run is over, and the record that
reports/training.json keeps. The child ignores SIGINT and SIGTERM, which reach the whole
process group at a Ctrl-C: the stage tells it how the run ended. When its stdin closes with no
command (the stage was killed), it closes the run as KILLED.

    python -m dltrain.train.liveproc     (started by LiveProcess, never by hand)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from dltrain.config import Params
from dltrain.paths import Workspace
from dltrain.tracking.store import display_uri, resolve_tracking_uri
from dltrain.train import live

# The longest the stage waits for the child past the child's own wait (live.FINISH_WAIT_S):
# an interpreter that imported MLflow takes a moment to answer and to exit.
SLACK_S = 5.0


class LiveProcess:
    """live.LiveRun's interface (start, wait_open, finish, abort), run by a child process."""

    def __init__(self, params: Params, ws: Workspace, summary: dict[str, Any], *,
                 storage: str, name: str, say: Callable[[str], None]) -> None:
        self.say = say
        self.tracking_uri = resolve_tracking_uri(params.register.tracking_uri, ws.root)
        self._start = {"params": params.to_dict(), "root": str(ws.root), "summary": summary,
                       "storage": storage, "name": name}
        self._opened = threading.Event()
        self._done = threading.Event()
        self._record: dict[str, Any] | None = None
        self._proc: subprocess.Popen | None = None
        self._reader = threading.Thread(target=self._read, name="dltrain-mlflow-child",
                                        daemon=True)

    def start(self) -> LiveProcess:
        self._proc = subprocess.Popen([sys.executable, "-m", "dltrain.train.liveproc"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._send(self._start)
        self._reader.start()
        return self

    def wait_open(self, timeout_s: float = live.OPEN_WAIT_S) -> None:
        self._opened.wait(timeout_s)

    def finish(self, epochs: list[dict[str, Any]]) -> dict[str, Any]:
        self._end({"finish": epochs}, live.FINISH_WAIT_S + SLACK_S)
        if self._record is not None:
            return self._record
        # No answer in time: what training.json can say without the child.
        return {"run_id": None, "training_id": None,
                "tracking_uri": display_uri(self.tracking_uri),
                "unsent_epochs": [e["epoch"] for e in epochs] or None}

    def abort(self, status: str) -> None:
        self._end({"abort": status}, 5.0 + SLACK_S)

    def _end(self, command: dict[str, Any], wait_s: float) -> None:
        self._send(command)
        self._done.wait(wait_s)
        if self._proc is not None:
            try:
                self._proc.wait(SLACK_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _send(self, message: dict[str, Any]) -> None:
        if self._proc is None or self._proc.stdin is None:
            return
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # the child is gone: nothing waits for it
            self._opened.set()
            self._done.set()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "say" in message:
                self.say(message["say"])
            elif "opened" in message:
                self._opened.set()
            elif "record" in message:
                self._record = message["record"]
                self._done.set()
        self._opened.set()
        self._done.set()


def _emit(out: TextIO, message: dict[str, Any]) -> None:
    try:
        out.write(json.dumps(message) + "\n")
        out.flush()
    except (BrokenPipeError, ValueError):  # the stage is gone: nobody reads it any more
        pass


def main() -> None:
    """The child: a LiveRun in this process, steered by the stage through stdin."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    # The protocol owns stdout; anything else printed (a library's warning) goes to stderr.
    out, sys.stdout = sys.stdout, sys.stderr
    start = json.loads(sys.stdin.readline())
    from dltrain.config import params_from_dict

    tracker = live.LiveRun(params_from_dict(start["params"]), Workspace.at(start["root"]),
                           start["summary"], storage=start["storage"], name=start["name"],
                           say=lambda text: _emit(out, {"say": text}))
    tracker.start()

    def opened() -> None:
        tracker.wait_open(None)
        _emit(out, {"opened": True})

    threading.Thread(target=opened, daemon=True).start()
    line = sys.stdin.readline()
    command = json.loads(line) if line.strip() else {"abort": "KILLED"}
    if "finish" in command:
        _emit(out, {"record": tracker.finish(command["finish"])})
    else:
        tracker.abort(command["abort"])
        _emit(out, {"record": None})
    os._exit(0)  # no interpreter teardown: MLflow's imports make it slow, and nothing is left


if __name__ == "__main__":
    main()
