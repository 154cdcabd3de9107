"""Live tracking: one MLflow run per training run, opened and fed by the train stage's driver.

The run goes to the store that register.tracking_uri names (dltrain.tracking.store), so register
completes the same run later (dltrain.registry.runlog.training_run). When training starts, the
driver opens the run (or finds the one a resumed run opened: the tag dltrain.training_id, whose
value is kept in the run directory) and logs the training params and the lineage tags (data set,
data checksum, git commit). Each epoch is logged when Ray Train has committed it: the controller
writes it into the run directory (dltrain.train.epochlog), and this module's thread sends what
is new, step = epoch number, skipping the epochs the run holds already, so a restart (a worker
lost, or the driver killed and re-run) logs every epoch once.

Only the driver talks to MLflow, in one background thread that also imports it (in local mode,
where the driver trains, that thread runs in a child process: dltrain.train.liveproc): Ray's
processes never import MLflow, and training never waits for it. When the store cannot be
reached the run goes on: one warning line, the epochs wait in the run directory (and in
reports/training.json), a new attempt at most every RETRY_S, and `dltrain register` sends what
is missing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from dltrain.config import Params
from dltrain.paths import Workspace, dvc_experiment
from dltrain.tracking import runs as tracking
from dltrain.tracking.store import display_uri, redact, resolve_tracking_uri
from dltrain.train import storage as run_storage

POLL_S = 0.5  # how often the run directory is looked at for a new epoch
RETRY_S = 30.0  # after a failure, how long until MLflow is tried again
FINISH_WAIT_S = 10.0  # the most the end of training waits for the last epochs to be sent
# In local mode (train.num_workers 0) this runs in a child process (dltrain.train.liveproc),
# whose import of MLflow would take a core from the first epoch: the stage lets the open
# finish first, waiting at most this long (an unreachable store answers within
# MLFLOW_HTTP_REQUEST_TIMEOUT); once open, an epoch costs one small request.
OPEN_WAIT_S = 10.0
# Set to 0 to train without live tracking (register then logs the whole run, as before).
SWITCH_ENV = "DLTRAIN_LIVE_TRACKING"


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class LiveRun:
    """The training run's MLflow run, kept up to date from a background thread."""

    def __init__(self, params: Params, ws: Workspace, summary: dict[str, Any], *,
                 storage: str, name: str, say: Callable[[str], None]) -> None:
        self.params, self.ws, self.summary = params, ws, summary
        self.storage, self.name, self.say = storage, name, say
        self.tracking_uri = resolve_tracking_uri(params.register.tracking_uri, ws.root)
        self.training_id: str | None = None
        self.run_id: str | None = None
        self._client: Any = None
        self._logged: set[int] = set()
        self._failed_at: float | None = None
        self._warned = False
        self._final: list[dict[str, Any]] | None = None
        self._status = "FINISHED"
        self._stop = threading.Event()
        self._tried = threading.Event()  # the first attempt to open the run is over
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name="dltrain-mlflow", daemon=True)

    def start(self) -> LiveRun:
        self._thread.start()
        return self

    def wait_open(self, timeout_s: float | None = OPEN_WAIT_S) -> None:
        """Wait until the first attempt to open the run is over (opened or failed), at most
        `timeout_s` (None: however long it takes)."""
        self._tried.wait(timeout_s)

    def finish(self, epochs: list[dict[str, Any]]) -> dict[str, Any]:
        """Send the epochs still unsent (`epochs`: the whole run, from its last checkpoint) and
        close the run as FINISHED, waiting at most FINISH_WAIT_S; what training.json records."""
        self._end(epochs, "FINISHED", FINISH_WAIT_S)
        return self.record(epochs)

    def abort(self, status: str) -> None:
        """Training failed (FAILED) or was interrupted (KILLED): send the epochs it finished and
        close the run with `status`, waiting a few seconds at most."""
        self._end(None, status, 5.0)

    def record(self, epochs: list[dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            unsent = [e["epoch"] for e in epochs if e["epoch"] not in self._logged]
        # None, not [], when all were sent: `dvc plots` reads every list in training.json as a
        # candidate series, and fails on an empty one.
        return {"run_id": self.run_id, "training_id": self.training_id,
                "tracking_uri": display_uri(self.tracking_uri), "unsent_epochs": unsent or None}

    # ------------------------------------------------------------------ the thread

    def _end(self, epochs: list[dict[str, Any]] | None, status: str, wait_s: float) -> None:
        self._final, self._status = epochs, status
        self._stop.set()
        self._thread.join(wait_s)

    def _main(self) -> None:
        while not self._stop.is_set():
            self._sync(None)
            self._tried.set()
            self._stop.wait(POLL_S)
        self._tried.set()
        if self._failed_at is not None:
            return  # unreachable: register sends the rest; the end of training does not wait
        self._sync(self._final)
        if self.run_id is None or self._failed_at is not None:
            return
        try:
            state = {"FINISHED": "complete", "FAILED": "failed"}.get(self._status, "interrupted")
            self._client.set_tag(self.run_id, tracking.TRAINING_STATE_TAG, state)
            self._client.set_terminated(self.run_id, self._status)
        except Exception as exc:  # noqa: BLE001  (tracking never fails training)
            self._failed(exc)

    def _sync(self, epochs: list[dict[str, Any]] | None) -> None:
        """Open the run if need be, then log the epochs it does not hold yet (`epochs`, else
        those in the run directory)."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_S:
            return
        try:
            if self.run_id is None:
                self._open()
            with self._lock:
                logged = set(self._logged)
            if epochs is None:
                epochs = run_storage.read_epochs(self.storage, self.name, logged)
            sent = tracking.log_epochs(self._client, self.run_id, epochs, logged)
            with self._lock:
                self._logged.update(sent)
            self._failed_at = None
        except Exception as exc:  # noqa: BLE001  (tracking never fails training)
            self._failed(exc)

    def _open(self) -> None:
        # A short wait and no retries: nothing here may hold training up, and a later epoch
        # tries again. A user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        from dltrain.tracking.store import quiet_mlflow

        quiet_mlflow()
        from mlflow import MlflowClient

        if self.training_id is None:
            self.training_id = run_storage.training_id(self.storage, self.name)
        if self._client is None:
            if self.tracking_uri.startswith("sqlite:///"):
                database = self.tracking_uri.removeprefix("sqlite:///")
                if os.path.exists(database):
                    # A damaged store is left alone (a note; register names it), never made
                    # into a fresh registry by MLflow's table set-up.
                    from pathlib import Path

                    from dltrain.tracking.store import check_sqlite_store

                    check_sqlite_store(Path(database))
                os.makedirs(os.path.dirname(database), exist_ok=True)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            if self.tracking_uri.startswith("sqlite:///"):
                from pathlib import Path

                from dltrain.tracking.store import check_artifact_root

                # A moved workspace's store: a note, and nothing written to the old place.
                check_artifact_root(client, Path(self.tracking_uri.removeprefix("sqlite:///")))
            self._client = client
        client = self._client
        experiment_id = tracking.experiment_id(client, self.tracking_uri, self.ws.root)
        flat = tracking.flatten({k: v for k, v in self.params.to_dict().items()
                                 if k in tracking.TRAINING_SECTIONS})
        run = tracking.find_training_run(client, experiment_id, self.training_id)
        if run is None:
            run = client.create_run(
                experiment_id, tags=self._tags(),
                run_name=tracking.display_name(self.name, self.summary.get("dataset")))
        else:  # a resumed run: running again, and it holds some epochs already
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, tracking.TRAINING_STATE_TAG, "running")
            with self._lock:
                self._logged |= tracking.logged_epochs(client, run.info.run_id)
        client.log_batch(run.info.run_id, params=tracking.missing_params(run, flat))
        self.run_id = run.info.run_id

    def _tags(self) -> dict[str, str]:
        from dltrain.train.outputs import git_commit

        t = self.params.train
        commit = git_commit(self.ws.root)
        tags = {tracking.RUN_NAME_TAG: self.name, tracking.TRAINING_ID_TAG: self.training_id,
                tracking.TRAINING_STATE_TAG: "running",
                tracking.EXPERIMENT_TAG: dvc_experiment(),
                "dataset": self.summary.get("dataset"),
                "data_checksum": self.summary.get("data_checksum"),
                # Local mode (0 workers) is one process: world size 1.
                "ray_world_size": max(1, t.num_workers),
                "train_mode": "local" if t.num_workers == 0 else "worker-group",
                "device": "cuda" if t.use_gpu else "cpu",
                "git_commit": commit, "mlflow.source.git.commit": commit}
        return {k: str(v) for k, v in tags.items() if v is not None}

    def _failed(self, exc: BaseException) -> None:
        self._failed_at = time.monotonic()
        if self._warned:
            return
        self._warned = True
        self.say(f"note: MLflow at {display_uri(self.tracking_uri)} cannot be reached "
                 f"({_reason(exc, self.tracking_uri)}); training goes on, its epochs "
                 f"wait in {self.storage}/{self.name} and reports/training.json, and "
                 "`dltrain register` sends them")


# What a failed request comes down to, in the words of the error that MLflow wraps it in.
_CAUSES = ("Connection refused", "timed out", "Name or service not known",
           "Temporary failure in name resolution", "No route to host", "database is locked")


def _reason(exc: BaseException, uri: str) -> str:
    """A short cause for the note: MLflow's message quotes the whole request (and the URI,
    whose password must not show)."""
    text = str(exc)
    for cause in _CAUSES:
        if cause in text:
            return cause.lower()
    first = (text.strip().splitlines() or [type(exc).__name__])[0]
    return redact(first, uri)[:160]
