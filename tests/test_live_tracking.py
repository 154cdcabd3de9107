"""Live tracking: one MLflow run per training run, opened by the train stage's driver and fed
each epoch while training runs, completed by register; and training while MLflow is down.

The first tests drive dltrain.train.live against a real SQLite store without Ray; the
integration tests run `dltrain train` in a subprocess (local mode: the tracking is the
driver's, with a worker group or without) and read the store while it runs. Restarts (a
killed worker, a killed driver) are asserted in the kill tests of tests/test_train.py and
tests/test_reliability.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dltrain.config import params_from_dict
from dltrain.evaluate.stage import evaluate
from dltrain.paths import Workspace
from dltrain.registry.register import register
from dltrain.tracking.runs import (
    EPOCH_KEYS,
    EPOCH_MARK,
    EPOCH_METRICS,
    RUN_NAME_TAG,
    TRAINING_ID_TAG,
    TRAINING_STATE_TAG,
    display_name,
)
from dltrain.tracking.store import EXPERIMENT, embedded_tracking_uri
from dltrain.train import live
from dltrain.train.epochlog import EpochLog
from dltrain.train.liveproc import LiveProcess
from dltrain.train.storage import EPOCHS_DIR, IDENTITY_FILE, read_epochs, write_epoch

from helpers.data import make_processed
from helpers.mlflow import free_port, seed_workspace_store, serve_mlflow
from helpers.repo import venv_env


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _epoch(n: int) -> dict[str, Any]:
    return {"epoch": n, "train_loss": 1.0 / n, "train_accuracy": 0.5 + n / 100,
            "val_loss": 1.1 / n, "val_accuracy": 0.5 + n / 50, "epoch_time_s": 2.0,
            "samples": 540, "attempt": 0, "peak_rss_mb": [300.0]}


def _history(client, run_id: str, key: str = "val_accuracy") -> list[tuple[int, float]]:
    """The run's history of an epoch figure, named as in training.json."""
    return sorted((m.step, m.value)
                  for m in client.get_metric_history(run_id, EPOCH_METRICS[key]))


def _wait(predicate, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.1)


# ----------------------------------------------------------------------------- in this process

def test_a_run_name_is_the_data_set_the_start_time_and_the_short_key() -> None:
    at = datetime(2026, 12, 7, 18, 22, 1)
    assert display_name("dltrain-4590e012b1c8", "mnist", at) == "mnist-20261207-182201-4590e012"
    # register's own run (training never reached MLflow): <model name>-<weights sha256>
    assert display_name("mnist-mlp-5b1e6e0e", None, at) == "20261207-182201-5b1e6e0e"


def _chart_section(metric: str) -> str:
    """The section MLflow 3's run page draws a metric's chart in: its name's part before the last
    "/" (the UI's extractChartSectionName), "" for the unnamed "Model metrics" section."""
    return metric.rpartition("/")[0]


def test_the_curves_come_before_the_one_point_figures_on_the_run_page() -> None:
    """MLflow 3's run page draws the named chart sections in alphabetical order, then the unnamed
    one: every epoch curve is in a named section, and register's one-point figures (test_*,
    samples_per_s) in the unnamed one, so the loss and accuracy curves come first."""
    sections = {_chart_section(name) for name in EPOCH_METRICS.values()}
    assert "" not in sections and sections == {"train", "val"}
    for key in ("loss", "accuracy"):
        assert {f"train/{key}", f"val/{key}"} <= set(EPOCH_METRICS.values())
    # Charts of a section are alphabetical: no other curve before loss and accuracy.
    assert sorted(EPOCH_METRICS.values())[:2] == ["train/accuracy", "train/loss"]
    for figure in ("test_accuracy", "test_loss", "test_macro_f1", "samples_per_s"):
        assert _chart_section(figure) == ""


def test_a_run_of_an_earlier_dltrain_is_continued_without_logging_its_epochs_again(
        tmp_path: Path) -> None:
    """A run that holds epochs under training.json's names (dltrain before the chart sections)
    and is resumed: its epochs are read as logged, and only the new ones are sent."""
    from mlflow.entities import Metric

    from dltrain.tracking.runs import log_epochs, logged_epochs

    seed_workspace_store(tmp_path)
    client = _client(embedded_tracking_uri(tmp_path))
    run_id = client.create_run(client.create_experiment("old")).info.run_id
    client.log_batch(run_id, metrics=[Metric(key, float(_epoch(n)[key]), 0, n)
                                      for n in (1, 2) for key in EPOCH_KEYS])
    assert logged_epochs(client, run_id) == {1, 2}
    assert log_epochs(client, run_id, [_epoch(n) for n in (1, 2, 3)]) == [3]
    assert _history(client, run_id, "val_accuracy") == [(3, _epoch(3)["val_accuracy"])]
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2]
    assert logged_epochs(client, run_id) == {1, 2, 3}
    assert [m.step for m in client.get_metric_history(run_id, EPOCH_MARK)] == [3]


def test_the_callback_writes_rank_0s_epoch_into_the_run_directory(tmp_path: Path) -> None:
    callback = EpochLog(str(tmp_path), "run")
    callback.after_report(None, [{**_epoch(2), "nodes": ["a", "b"]}, _epoch(2)], None)
    callback.after_report(None, [{**_epoch(1), "nodes": ["a"]}], None)
    callback.after_report(None, [{"no": "epoch"}], None)  # not an epoch's report: ignored
    files = sorted(p.name for p in (tmp_path / "run" / EPOCHS_DIR).iterdir())
    assert files == ["epoch_0001.json", "epoch_0002.json"]  # no temporary file left
    assert read_epochs(str(tmp_path), "run") == [_epoch(1), _epoch(2)]  # without "nodes"
    # A file still being written is not read (it is written under another name, then renamed).
    (tmp_path / "run" / EPOCHS_DIR / "epoch_0003.json").write_text('{"epoch": 3, "trai')
    assert [e["epoch"] for e in read_epochs(str(tmp_path), "run")] == [1, 2]


def test_a_resumed_training_continues_its_run_and_logs_every_epoch_once(tmp_path: Path) -> None:
    """Without Ray: the epochs the controller would write, sent by two drivers in turn (the
    second one a re-run that resumes), into one MLflow run."""
    ws = Workspace.at(tmp_path)
    storage = str(tmp_path / ".ray_results")
    params = params_from_dict({"train": {"epochs": 4}})
    summary = {"dataset": "fashion-mnist", "data_checksum": "c" * 64}
    lines: list[str] = []
    seed_workspace_store(ws.root)
    client = _client(embedded_tracking_uri(ws.root))

    first = live.LiveRun(params, ws, summary, storage=storage, name="dltrain-x",
                         say=lines.append).start()
    write_epoch(storage, "dltrain-x", _epoch(1))
    _wait(lambda: first.run_id and _history(client, first.run_id), what="epoch 1 logged")
    run_id = first.run_id
    run = client.get_run(run_id)
    # The name a user reads in the run list: data set, start time, short key; the key is a tag.
    assert run.info.status == "RUNNING"
    assert re.fullmatch(r"fashion-mnist-\d{8}-\d{6}-x", run.info.run_name), run.info.run_name
    assert run.data.tags[RUN_NAME_TAG] == "dltrain-x"
    assert run.data.tags["data_checksum"] == "c" * 64
    assert run.data.params["train.epochs"] == "4" and "register.model_name" not in run.data.params
    write_epoch(storage, "dltrain-x", _epoch(2))
    _wait(lambda: len(_history(client, run_id)) == 2, what="epoch 2 logged")
    first.abort("KILLED")  # the driver interrupted
    assert client.get_run(run_id).info.status == "KILLED"

    # The re-run resumes (the run directory, with its identity, is kept): the same run.
    second = live.LiveRun(params, ws, summary, storage=storage, name="dltrain-x",
                          say=lines.append).start()
    for n in (3, 4):
        write_epoch(storage, "dltrain-x", _epoch(n))
    record = second.finish([_epoch(n) for n in range(1, 5)])
    assert record["run_id"] == run_id and record["unsent_epochs"] is None
    assert record["training_id"] == json.loads(
        (tmp_path / ".ray_results" / "dltrain-x" / IDENTITY_FILE).read_text())["training_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[TRAINING_STATE_TAG] == "complete"
    for key in EPOCH_KEYS:
        assert _history(client, run_id, key) == [(n, _epoch(n)[key]) for n in range(1, 5)]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert lines == []  # the store was there: nothing to say

    # Trained again with the same params (a finished run's directory goes): the same key, a
    # new run, found by its own training id, under a name the run list tells apart.
    shutil.rmtree(tmp_path / ".ray_results" / "dltrain-x")
    time.sleep(1.1)  # the names carry the start time to the second
    third = live.LiveRun(params, ws, summary, storage=storage, name="dltrain-x",
                         say=lines.append).start()
    record = third.finish([_epoch(1)])
    assert record["run_id"] != run_id
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {run_id, record["run_id"]}
    assert runs[record["run_id"]].data.tags[TRAINING_ID_TAG] == record["training_id"]
    assert {r.data.tags[RUN_NAME_TAG] for r in runs.values()} == {"dltrain-x"}
    assert len({r.info.run_name for r in runs.values()}) == 2


@pytest.mark.integration  # a child process that imports MLflow
def test_local_modes_child_process_feeds_and_closes_the_run(tmp_path: Path) -> None:
    """dltrain.train.liveproc, local mode's tracker: a child process opens the run, sends the
    epochs the run directory gets while training runs, then the rest, and closes the run."""
    ws = Workspace.at(tmp_path)
    storage = str(tmp_path / ".ray_results")
    seed_workspace_store(ws.root)
    client = _client(embedded_tracking_uri(ws.root))
    lines: list[str] = []
    tracker = LiveProcess(params_from_dict({"train": {"epochs": 2}}), ws,
                          {"dataset": "fashion-mnist"}, storage=storage, name="dltrain-p",
                          say=lines.append).start()
    tracker.wait_open(60)

    def runs() -> list:
        return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])

    write_epoch(storage, "dltrain-p", _epoch(1))
    _wait(lambda: runs() and _history(client, runs()[0].info.run_id), what="epoch 1 logged")
    assert runs()[0].info.status == "RUNNING"
    record = tracker.finish([_epoch(1), _epoch(2)])
    assert record["run_id"] == runs()[0].info.run_id and record["unsent_epochs"] is None
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[TRAINING_STATE_TAG] == "complete"
    assert _history(client, record["run_id"]) == [(n, _epoch(n)["val_accuracy"]) for n in (1, 2)]
    assert len(runs()) == 1 and lines == []


def test_an_unreachable_store_is_one_line_and_nothing_waits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.at(tmp_path)
    storage = str(tmp_path / ".ray_results")
    # Nothing listens there; the environment may carry a password (params may not).
    password = "s3cret"
    uri = f"http://u:{password}@127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as in a fresh driver
    lines: list[str] = []
    tracker = live.LiveRun(params_from_dict({}), ws, {"dataset": "fashion-mnist"},
                           storage=storage, name="dltrain-y", say=lines.append).start()
    for n in (1, 2, 3):
        write_epoch(storage, "dltrain-y", _epoch(n))
        time.sleep(live.POLL_S * 2)
    _wait(lambda: lines, what="the note")
    started = time.monotonic()
    record = tracker.finish([_epoch(n) for n in (1, 2, 3)])
    assert time.monotonic() - started < 1.0  # the end of training does not wait for MLflow
    assert record["run_id"] is None and record["unsent_epochs"] == [1, 2, 3]
    assert record["tracking_uri"] == uri.replace(password, "***")
    assert len(lines) == 1, lines  # once, not per epoch
    assert "cannot be reached" in lines[0] and "dltrain register" in lines[0]
    assert password not in lines[0] + json.dumps(record)


# ----------------------------------------------------------------------------- dltrain train

def _workspace(tmp_path: Path, epochs: int, n_train: int, hidden: int = 32,
               **register: Any) -> Path:
    """A git workspace whose `dltrain train` runs in local mode (train.num_workers 0): what
    these tests check is the driver's tracking, the same with a worker group or without."""
    ws = make_processed(tmp_path, n_train=n_train, n_test=200)
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [hidden]},
        "train": {"epochs": epochs, "batch_size": 32, "num_workers": 0},
        "register": {"min_accuracy": 0.5, **register}}))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git + ["init", "-q"], cwd=ws, check=True)
    subprocess.run(git + ["add", "params.yaml"], cwd=ws, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "params"], cwd=ws, check=True)
    return ws


def _evaluate_and_register(ws_root: Path) -> dict[str, Any]:
    ws = Workspace.at(ws_root)
    params = params_from_dict(json.loads(ws.params_path.read_text()))
    evaluate(ws.model_path, ws.processed_dir, ws.reports_dir, batch_size=256)
    return register(ws, params, attempts=2, backoff_s=0.5)


@pytest.mark.integration
def test_epochs_reach_mlflow_while_training_runs_and_register_completes_that_run(
        tmp_path: Path) -> None:
    # Epochs long enough (a second or more) that the run is read while it still trains.
    epochs = 8
    ws = _workspace(tmp_path, epochs, n_train=12000, hidden=256)
    uri = embedded_tracking_uri(ws)
    client = _client(uri)  # the store is there (_workspace): the driver and this test share it
    proc = subprocess.Popen([sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)],
                            env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        seen: list[tuple[int, float]] = []
        deadline = time.monotonic() + 300
        while not seen:
            assert proc.poll() is None, f"training ended before MLflow showed an epoch:\n" \
                                        f"{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no epoch in MLflow within 300 s"
            experiment = client.get_experiment_by_name(EXPERIMENT)
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs:
                seen = _history(client, runs[0].info.run_id)
                running = runs[0].info.status
            time.sleep(0.2)
        # Read while the driver still trains: the run is open and holds the first epoch(s).
        assert proc.poll() is None and not (ws / "reports" / "training.json").exists()
        assert running == "RUNNING" and seen[0][0] == 1 and len(seen) < epochs
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "MLflow" not in output  # reachable: no note

    report = json.loads((ws / "reports" / "training.json").read_text())
    tracked = report["mlflow"]
    assert tracked["tracking_uri"] == uri and tracked["unsent_epochs"] is None
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[TRAINING_STATE_TAG] == "complete"
    assert run.data.tags[TRAINING_ID_TAG] == tracked["training_id"]
    assert run.data.tags[RUN_NAME_TAG] == report["run_name"]
    assert run.info.run_name.endswith(report["run_name"].removeprefix("dltrain-")[:8])
    summary = json.loads((ws / "data" / "processed" / "summary.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert run.data.tags["data_checksum"] == summary["data_checksum"]
    assert run.data.tags["git_commit"] == run.data.tags["mlflow.source.git.commit"] == commit
    assert run.data.params["train.epochs"] == str(epochs)
    for key in EPOCH_KEYS:  # every epoch once, the values training.json has
        assert _history(client, run.info.run_id, key) == [
            (e["epoch"], pytest.approx(e[key])) for e in report["epochs"]]

    outcome = _evaluate_and_register(ws)
    assert outcome["registered"] and outcome["run_id"] == tracked["run_id"]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [
        tracked["run_id"]]
    run = client.get_run(tracked["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(outcome["test_accuracy"])
    assert "register.min_accuracy" in run.data.params
    assert run.data.tags["weights_sha256"] == outcome["weights_sha256"]
    assert len(_history(client, run.info.run_id)) == epochs  # register added no epoch twice
    assert {a.path for a in client.list_artifacts(run.info.run_id, "reports")} >= {
        "reports/metrics.json", "reports/confusion_matrix.png"}


@pytest.mark.integration
def test_training_with_the_tracking_server_down_completes_and_register_sends_the_epochs(
        tmp_path: Path) -> None:
    port = free_port()  # nothing listens there until the server starts below
    epochs = 3
    ws = _workspace(tmp_path, epochs, n_train=600, tracking_uri=f"http://127.0.0.1:{port}")
    done = subprocess.run([sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)],
                          env=venv_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    notes = [line for line in done.stdout.splitlines() if "cannot be reached" in line]
    assert len(notes) == 1, done.stdout  # one line, not one per epoch
    assert f"MLflow at http://127.0.0.1:{port}" in notes[0]
    report = json.loads((ws / "reports" / "training.json").read_text())
    assert report["mlflow"]["run_id"] is None
    assert report["mlflow"]["unsent_epochs"] == list(range(1, epochs + 1))
    # The buffer: each epoch in the run directory, as well as in training.json.
    run_dir = Path(report["storage_path"]) / report["run_name"]
    assert [e["epoch"] for e in read_epochs(str(run_dir.parent), run_dir.name)] == [1, 2, 3]

    with serve_mlflow(port, tmp_path / "server") as uri:
        outcome = _evaluate_and_register(ws)
        client = _client(uri)
        run = client.get_run(outcome["run_id"])
        assert run.data.tags[TRAINING_ID_TAG] == report["mlflow"]["training_id"]
        assert run.data.tags[RUN_NAME_TAG] == report["run_name"]
        assert run.info.run_name.endswith(report["run_name"].removeprefix("dltrain-")[:8])
        for key in EPOCH_KEYS:
            assert _history(client, run.info.run_id, key) == [
                (e["epoch"], pytest.approx(e[key])) for e in report["epochs"]]
        assert run.data.metrics["test_accuracy"] == pytest.approx(outcome["test_accuracy"])
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert len(client.search_runs([experiment.experiment_id])) == 1
