"""The mnist-training flow (flows/): its pieces, each task alone, and the whole flow under
Prefect's test harness, on tiny synthetic data through real DVC, Ray and MLflow."""

from __future__ import annotations

import io
import json
import logging
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dltrain.errors import ConfigError
from flows import mnist_training as mt
from flows.dvc_stage import (
    StageFailedError,
    StageResult,
    _pump,
    parse_outcome,
    run_stage,
    unchanged,
)
from flows.report import model_link, run_summary
from flows.workspace import (
    WorkspaceBusyError,
    params_overridden,
    render_overrides,
    validate_overrides,
    workspace_lock,
)

from conftest import REPO_ROOT, make_clone, write_raw_dir

LOG = logging.getLogger("test_flows")
TINY_TRAIN = {"train.epochs": 1, "train.num_workers": 1}


def dvc_lock(clone: Path) -> dict:
    return yaml.safe_load((clone / "dvc.lock").read_text())


def dvc_lock_text(clone: Path) -> str | None:
    """dvc.lock as it is (a clone may carry one from the working tree), None if absent."""
    path = clone / "dvc.lock"
    return path.read_text() if path.exists() else None


# --- the stage list and DVC's verdicts ---------------------------------------------------

def test_stages_are_dvc_yaml_stages_in_order():
    stages = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
    assert [s.name for s in mt.STAGES] == stages
    assert [s.name for s in mt.STAGES] == ["download", "preprocess", "train", "evaluate",
                                          "register"]
    assert {name: t.name for name, t in mt.TASKS.items()} == {s: s for s in stages}


def test_only_download_retries_and_every_task_has_a_timeout():
    assert mt.download.retries == 3
    assert [mt.TASKS[s.name].retries for s in mt.STAGES[1:]] == [0, 0, 0, 0]
    assert all(mt.TASKS[s.name].timeout_seconds == s.timeout_s > 0 for s in mt.STAGES)
    train_timeout = mt.train.timeout_seconds
    assert train_timeout > mt.preprocess.timeout_seconds  # training is the long stage


@pytest.mark.parametrize("lines, outcome", [
    (["Running stage 'train':", "> dltrain train"], "ran"),
    (["Stage 'train' didn't change, skipping", "Data and pipelines are up to date."], "skipped"),
    (["Stage 'train' is cached - skipping run, checking out outputs"], "restored"),
    (["Stage 'download' didn't change, skipping"], None),  # another stage's verdict
    (["Data and pipelines are up to date."], None),
])
def test_parse_outcome(lines, outcome):
    assert parse_outcome("train", lines) == outcome


def test_pump_keeps_one_line_per_progress_bar():
    out = b"start\nepoch 1:  10%\repoch 1:  50%\repoch 1: 100%\ndone\r\npartial"
    q: queue.Queue[str | None] = queue.Queue()
    _pump(io.BufferedReader(io.BytesIO(out)), q)
    items = []
    while (item := q.get()) is not None:
        items.append(item)
    assert items == ["start", "epoch 1: 100%", "done", "partial"]


# --- params for one run ------------------------------------------------------------------

PARAMS_TEXT = """\
# a comment that must survive
data:
  dataset: fashion-mnist   # fashion-mnist | mnist
  source: null
train:
  epochs: 5                # the seed's
  num_workers: 2
"""


def test_render_overrides_keeps_comments_and_sets_values():
    out = render_overrides(PARAMS_TEXT, {"train.epochs": 1, "data.source": "file:///x",
                                         "evaluate.batch_size": 10})
    assert "# a comment that must survive" in out
    assert "# the seed's" in out and "# fashion-mnist | mnist" in out
    assert yaml.safe_load(out) == {
        "data": {"dataset": "fashion-mnist", "source": "file:///x"},
        "train": {"epochs": 1, "num_workers": 2}, "evaluate": {"batch_size": 10}}


def test_params_overridden_restores_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    with params_overridden(path, {"train.epochs": 1}):
        assert yaml.safe_load(path.read_text())["train"]["epochs"] == 1
    assert path.read_text() == PARAMS_TEXT


def test_params_overridden_keeps_an_edit_made_during_the_run(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    with params_overridden(path, {"train.epochs": 1}):
        path.write_text(PARAMS_TEXT.replace("epochs: 5", "epochs: 7"))
    assert "epochs: 7" in path.read_text()


@pytest.mark.parametrize("overrides, message", [
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.epochs": "many"}, "train.epochs"),
    ({"data.dataset": "cifar"}, "data.dataset"),
    ({"train.nope": 1}, "unknown key train.nope"),
    ({"epochs": 1}, "expected section.key"),
])
def test_validate_overrides_names_the_bad_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_overrides(REPO_ROOT / "params.yaml", overrides)


def test_run_overrides_maps_named_parameters(monkeypatch):
    named = {"dataset": "mnist", "epochs": 2, "num_workers": None, "use_gpu": False,
             "ray_address": None}
    assert mt.run_overrides(named, {"data.seed": 1}) == {
        "data.seed": 1, "data.dataset": "mnist", "train.epochs": 2, "train.use_gpu": False}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert mt.run_overrides({"ray_address": "env"}, None) == {
        "train.ray_address": "10.0.0.1:6379"}
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="RAY_ADDRESS is not set"):
        mt.run_overrides({"ray_address": "env"}, None)


def test_resolve_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("DLTRAIN_WORKSPACE", raising=False)
    assert mt.resolve_workspace(None).root == REPO_ROOT
    monkeypatch.setenv("DLTRAIN_WORKSPACE", str(tmp_path))
    with pytest.raises(ConfigError, match="has no dvc.yaml"):
        mt.resolve_workspace(None)


# --- the workspace lock ------------------------------------------------------------------

def test_second_holder_fails_fast_naming_the_first(tmp_path):
    with workspace_lock(tmp_path, "flow run 1234 (brave-fox)"):
        # Another process, as a second flow run would be.
        code = ("import sys; from pathlib import Path; from flows.workspace import "
                "workspace_lock\nwith workspace_lock(Path(sys.argv[1]), 'second'): pass")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
        assert proc.returncode != 0
        assert "WorkspaceBusyError" in proc.stderr
        assert "in use by another pipeline run (flow run 1234 (brave-fox), pid" in proc.stderr
    with workspace_lock(tmp_path, "third"):  # released: the next run gets it
        pass


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with workspace_lock(tmp_path, "first"), pytest.raises(WorkspaceBusyError, match="first"):
        with workspace_lock(tmp_path, "second"):
            pass


# --- the run summary ---------------------------------------------------------------------

def test_summary_tolerates_missing_reports(tmp_path):
    from dltrain.paths import Workspace

    md = run_summary(Workspace.at(tmp_path), {"download": StageResult("download", "ran", 1.0)},
                     {"train.epochs": 1})
    assert "| download | ran | 1.0 |" in md
    assert "`train.epochs=1`" in md
    for missing in ("data/processed/summary.json", "reports/training.json",
                    "reports/metrics.json", "reports/registration.json"):
        assert f"{missing} is missing" in md


def test_summary_from_reports(tmp_path):
    from dltrain.io import write_json
    from dltrain.paths import Workspace

    ws = Workspace.at(tmp_path)
    write_json(ws.processed_dir / "summary.json",
               {"dataset": "mnist", "data_checksum": "abc123", "train": {"n": 540}})
    write_json(ws.training_report_path, {"world_size": 2, "samples_per_s": 1234.5, "epochs": [
        {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4,
         "val_accuracy": 0.85, "epoch_time_s": 1.25}]})
    write_json(ws.metrics_path, {"accuracy": 0.9, "loss": 0.3})
    write_json(ws.registration_path, {"model_name": "mnist-mlp", "version": 3,
                                      "aliases": ["champion"], "registered": True,
                                      "new_version": True})
    md = run_summary(ws, {}, {})
    assert "data set: **mnist**" in md and "`abc123`" in md and "train: 540 samples" in md
    assert "| 1 | 0.5000 | 0.8000 | 0.4000 | 0.8500 | 1.25 |" in md
    assert "- accuracy: 0.9000" in md
    assert "registered a new version: **mnist-mlp** version **3**, aliases: champion" in md


@pytest.mark.parametrize("registration, uri, link", [
    ({"model_name": "mnist mlp", "version": 2}, "http://mlflow:5000/",
     "http://mlflow:5000/#/models/mnist%20mlp/versions/2"),
    ({"model_name": "m", "version": 2}, "sqlite:///mlflow.db", None),
    ({"model_name": "m", "version": None}, "http://mlflow:5000", None),
    (None, "http://mlflow:5000", None),
])
def test_model_link(registration, uri, link):
    assert model_link(registration, uri) == link


# --- each task alone, on a tiny workspace --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory) -> Path:
    """A fresh clone whose params point data.source at tiny synthetic IDX files; the task
    tests below run its stages one by one, in order."""
    root = tmp_path_factory.mktemp("tasks")
    clone = make_clone(root / "clone")
    source = write_raw_dir(root / "source")
    (clone / "params.yaml").write_text(render_overrides(
        (clone / "params.yaml").read_text(), {"data.source": source.as_uri(), **TINY_TRAIN}))
    return clone


@pytest.mark.integration
def test_download_task_runs_then_skips(tiny_workspace):
    first = mt.download.fn(str(tiny_workspace))
    assert first.outcome == "ran"
    assert (tiny_workspace / "data" / "raw" / "manifest.json").is_file()
    lock = (tiny_workspace / "dvc.lock").read_text()
    second = mt.download.fn(str(tiny_workspace))
    assert second.outcome == "skipped"
    assert (tiny_workspace / "dvc.lock").read_text() == lock


@pytest.mark.integration
def test_preprocess_task(tiny_workspace):
    assert mt.preprocess.fn(str(tiny_workspace)).outcome == "ran"
    assert mt.preprocess.fn(str(tiny_workspace)).outcome == "skipped"
    assert "preprocess" in dvc_lock(tiny_workspace)["stages"]
    assert json.loads((tiny_workspace / "data/processed/summary.json").read_text())["train"]


@pytest.mark.integration
def test_train_task(tiny_workspace):
    assert mt.train.fn(str(tiny_workspace)).outcome == "ran"
    assert dvc_lock(tiny_workspace)["stages"]["train"]["params"]["params.yaml"][
        "train.epochs"] == 1
    assert len(json.loads((tiny_workspace / "reports/training.json").read_text())["epochs"]) == 1


@pytest.mark.integration
def test_evaluate_task(tiny_workspace):
    assert mt.evaluate.fn(str(tiny_workspace)).outcome == "ran"
    assert 0.0 <= json.loads((tiny_workspace / "reports/metrics.json").read_text())[
        "accuracy"] <= 1.0


@pytest.mark.integration
def test_register_task(tiny_workspace):
    assert mt.register.fn(str(tiny_workspace)).outcome == "ran"
    registration = json.loads((tiny_workspace / "reports/registration.json").read_text())
    assert registration["model_name"] == "mnist-mlp" and registration["version"] is not None


@pytest.mark.integration
def test_a_failing_stage_names_itself_and_leaves_dvc_lock(fresh_clone, tmp_path):
    (fresh_clone / "params.yaml").write_text(render_overrides(
        (fresh_clone / "params.yaml").read_text(),
        {"data.source": (tmp_path / "nowhere").as_uri()}))
    lock = dvc_lock_text(fresh_clone)
    with pytest.raises(StageFailedError, match="stage 'download' failed"):
        mt.download.fn(str(fresh_clone))
    assert dvc_lock_text(fresh_clone) == lock
    assert not (fresh_clone / "data" / "raw").exists()


@pytest.mark.integration
def test_a_stage_past_its_timeout_is_stopped(fresh_clone, tiny_source):
    (fresh_clone / "params.yaml").write_text(render_overrides(
        (fresh_clone / "params.yaml").read_text(), {"data.source": tiny_source.as_uri()}))
    lock = dvc_lock_text(fresh_clone)
    with pytest.raises(StageFailedError, match="did not finish within its timeout of 0 s"):
        run_stage("download", fresh_clone, LOG, timeout_s=0.3)
    # Nothing half-recorded: dvc.lock is as it was, or (when the stop landed while DVC was
    # already committing) it records the complete stage, which DVC then finds up to date.
    after = dvc_lock_text(fresh_clone)
    # DVC released its lock: the stage runs normally afterwards.
    outcome = run_stage("download", fresh_clone, LOG).outcome
    if after == lock:
        assert outcome == "ran"
    else:
        assert outcome == "skipped" and dvc_lock_text(fresh_clone) == after


@pytest.mark.integration
def test_a_locked_dvc_repo_gets_a_clear_message(fresh_clone):
    from dvc.repo import Repo

    with Repo(str(fresh_clone)) as repo, repo.lock, pytest.raises(
            StageFailedError, match="another DVC process .* holds the lock"):
        run_stage("download", fresh_clone, LOG)


# --- the whole flow under Prefect's test harness -------------------------------------------

@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server and database for every flow test of the session
    (start-up takes ~20 s on a busy machine: a generous timeout)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_runs_in_order(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # A task run is named <task name>-<3-character suffix>.
    return [r.name.rsplit("-", 1)[0] for r in sorted(runs, key=lambda r: r.start_time)]


def _summary_artifact() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        return next(a.data for a in artifact if a.key == "mnist-training-summary")


@pytest.mark.integration
def test_flow_rejects_a_bad_override_before_any_stage(prefect_harness, fresh_clone):
    params_before = (fresh_clone / "params.yaml").read_text()
    lock = dvc_lock_text(fresh_clone)
    with pytest.raises(ConfigError, match=r"train\.epochs: 0"):
        mt.mnist_training(epochs=0, workspace=str(fresh_clone))
    assert dvc_lock_text(fresh_clone) == lock
    assert not (fresh_clone / "data" / "raw").exists()
    assert (fresh_clone / "params.yaml").read_text() == params_before


@pytest.mark.integration
def test_flow_runs_the_stages_in_order_then_skips_them(prefect_harness, fresh_clone,
                                                      tiny_source):
    params_before = (fresh_clone / "params.yaml").read_text()
    run = dict(epochs=1, num_workers=1, workspace=str(fresh_clone),
               overrides={"data.source": tiny_source.as_uri()})
    state = mt.mnist_training(**run, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {s.name: "ran" for s in mt.STAGES}
    assert _task_runs_in_order(state.state_details.flow_run_id) == [s.name for s in mt.STAGES]
    # The run's overrides are recorded in dvc.lock; params.yaml is as it was.
    train_params = dvc_lock(fresh_clone)["stages"]["train"]["params"]["params.yaml"]
    assert (train_params["train.epochs"], train_params["train.num_workers"]) == (1, 1)
    assert (fresh_clone / "params.yaml").read_text() == params_before
    summary = _summary_artifact()
    assert "| train | ran |" in summary and "| 1 | " in summary and "accuracy" in summary

    # Nothing changed: DVC skips every stage, no new version is registered.
    registration = (fresh_clone / "reports/registration.json").read_text()
    again = mt.mnist_training(**run)
    assert again == {s.name: "skipped" for s in mt.STAGES}
    assert (fresh_clone / "reports/registration.json").read_text() == registration


@pytest.mark.integration
def test_a_second_run_on_a_busy_workspace_fails_fast(prefect_harness, fresh_clone):
    params_before = (fresh_clone / "params.yaml").read_text()
    lock = dvc_lock_text(fresh_clone)
    with workspace_lock(fresh_clone, "flow run 0000 (first-run)"):
        start = time.monotonic()
        with pytest.raises(WorkspaceBusyError, match=r"in use by another pipeline run "
                                                     r"\(flow run 0000 \(first-run\)"):
            mt.mnist_training(epochs=1, workspace=str(fresh_clone))
        assert time.monotonic() - start < 30  # no waiting on the first run
    assert (fresh_clone / "params.yaml").read_text() == params_before
    assert dvc_lock_text(fresh_clone) == lock


@pytest.mark.integration
def test_in_process_check_agrees_with_dvc(tiny_workspace, tmp_path, monkeypatch):
    """The skip shortcut is DVC's own Stage.changed(): unchanged after a run, changed after a
    param edit, from any working directory."""
    monkeypatch.chdir(tmp_path)
    if not (tiny_workspace / "data" / "processed").exists():
        run_stage("preprocess", tiny_workspace, LOG)
    assert unchanged("download", tiny_workspace) and unchanged("preprocess", tiny_workspace)
    with params_overridden(tiny_workspace / "params.yaml", {"data.val_fraction": 0.2}):
        assert not unchanged("preprocess", tiny_workspace)
        assert unchanged("download", tiny_workspace)  # download does not read val_fraction
    assert not unchanged("no-such-stage", tiny_workspace)
