"""`dltrain tune` (dltrain/tune): the tune: section's checks (unit tier: one line, exit 2,
before any Ray starts), the report, and real sweeps on Ray Tune with MLflow on SQLite
(integration): trials tracked as child runs of the sweep's parent run, a poor trial stopped
early by ASHA, and an interrupted sweep resumed without training its finished trials again."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dltrain import cli
from dltrain.config import apply_overrides, params_from_dict
from dltrain.errors import ConfigError
from dltrain.paths import Workspace
from dltrain.tune import sweep
from dltrain.tune.report import best_trial, build_report, table_lines
from dltrain.tune.space import baseline, sweep_name, trial_count, trial_params

from helpers.mlflow import seed_workspace_store
from helpers.repo import REPO_ROOT, venv_env

GOOD_LR, BAD_LR = 0.003, 1e-7  # the tiny data is learned at once at the first, never at the second


def _tune(**tune: object) -> dict:
    return {"train": {"epochs": 2}, "tune": {"space": {"train.learning_rate": 0.001}, **tune}}


BAD_SPACES = [
    (_tune(num_samples=0), "invalid value for tune.num_samples: 0; expected a value >= 1"),
    (_tune(space={"train.learnig_rate": {"choice": [0.1]}}),
     "unknown key tune.space train.learnig_rate (did you mean train.learning_rate?)"),
    (_tune(space={"data.seed": {"choice": [1, 2]}}), "unknown key tune.space data.seed"),
    (_tune(space={"train.batch_size": {"choice": []}}),
     "invalid tune.space train.batch_size: choice needs a non-empty list of values"),
    (_tune(space={"train.epochs": {"grid": []}}), "grid needs a non-empty list"),
    (_tune(metric="test_accuracy"), "invalid value for tune.metric: 'test_accuracy'"),
    (_tune(metric="val_acc"), "a metric each epoch reports: val_accuracy or val_loss"),
    (_tune(space={"train.learning_rate": {"loguniform": [0, 0.1]}}),
     "loguniform needs low > 0"),
    (_tune(space={"train.learning_rate": {"grid": [0.1, -1]}}),
     "tune.space train.learning_rate: invalid value for train.learning_rate: -1"),
    (_tune(space={"train.optimizer": {"choice": ["adam", "adagrad"]}}),
     "invalid value for train.optimizer: 'adagrad'; expected one of 'rmsprop', 'adam'"),
    (_tune(space={"train.epochs": {"uniform": [1, 4]}}),
     "invalid type for train.epochs: 2.8; expected an integer"),
    (_tune(space={"model.hidden_sizes": {"choice": [[64], [0]]}}),
     "invalid value for model.hidden_sizes[0]: 0"),
    (_tune(space={"train.learning_rate": {"loguniformm": [0.1, 1]}}),
     "(did you mean loguniform?)"),
    (_tune(space={"train.num_workers": {"choice": [1, 2]}}),
     "tune.space train.num_workers: not a key a trial may vary"),
    (_tune(space={"train.batch_size": {"choice": [96, 100]}}) | {
        "train": {"epochs": 2, "num_workers": 3, "batch_size": 96}},
     "train.batch_size 100 is not a multiple of train.num_workers (3)"),
    (_tune(space={"train.epochs": {"grid": [2, 3]}}, search="optuna"),
     "grid needs tune.search: random"),
    (_tune(spaces={}), "unknown key tune.spaces (did you mean tune.space?)"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_SPACES)
def test_a_bad_tune_section_is_one_line_naming_the_cause(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        params_from_dict(raw)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("raw", "message"), BAD_SPACES[:3])
def test_dltrain_tune_exits_2_on_a_bad_space_before_any_trial(
        raw: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["tune", "--workspace", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dltrain tune: error: ") and message in err
    assert not (tmp_path / ".ray_results").exists() and not (tmp_path / "reports").exists()


def test_asha_that_could_stop_no_trial_is_refused_by_the_sweep_only(tmp_path: Path) -> None:
    """The grace period is checked against the trials' epochs when a sweep starts; any other
    command may set train.epochs below it (the example space leaves epochs to train:)."""
    raw = _tune(grace_period=2)
    params = params_from_dict(raw)  # loads: `dltrain train -S train.epochs=...` must work
    with pytest.raises(ConfigError) as caught:
        sweep.tune(params, Workspace.at(tmp_path))
    assert "tune.grace_period 2 is not below the trials' epochs (2)" in str(caught.value)
    assert not (tmp_path / "reports").exists()
    repo = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert params_from_dict(apply_overrides(repo, {"train.epochs": 1})).train.epochs == 1


def test_no_space_and_a_missing_search_package_are_user_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.at(tmp_path)
    with pytest.raises(ConfigError, match="params.yaml has no tune.space"):
        sweep.tune(params_from_dict({}), ws)
    monkeypatch.setitem(sweep.SEARCH_PACKAGES, "optuna", "dltrain_no_such_package")
    with pytest.raises(ConfigError, match="the dltrain_no_such_package package is not "
                                          r"installed: pip install 'dltrain\[tune\]'"):
        sweep.tune(params_from_dict(_tune(search="optuna")), ws)


def test_the_repo_params_hold_a_valid_example_space_that_no_stage_reads() -> None:
    params = params_from_dict(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))
    assert trial_count(params) >= 8
    assert params.tune.scheduler == "asha" and params.tune.metric == "val_accuracy"
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    read = [p for stage in stages.values() for p in stage.get("params", [])
            for p in ([p] if isinstance(p, str) else p)]
    # The register stage reads tune.applied, the record of an applied sweep (it tags the
    # version); no stage reads the sweep's own keys.
    assert read and not [p for p in read if str(p).startswith("tune") and p != "tune.applied"]
    assert [name for name, stage in stages.items()
            if "tune.applied" in stage.get("params", [])] == ["register"]
    assert "tune" not in params.to_dict()  # nor a model card's or a training run's params


def test_trials_params_and_the_sweep_name() -> None:
    raw = _tune(space={"train.learning_rate": {"loguniform": ["1e-4", "1e-2"]},
                       "model.hidden_sizes": {"grid": [[64], [128, 64]]}, "train.epochs": 3},
                num_samples=3)
    params = params_from_dict(raw)
    assert trial_count(params) == 6
    trial = trial_params(params, {"train.learning_rate": 0.002, "train.epochs": 3,
                                  "model.hidden_sizes": "[128, 64]"})
    assert trial.model.hidden_sizes == (128, 64) and trial.train.learning_rate == 0.002
    name = sweep_name(params, {"data_checksum": "a"})
    # A varied key's params.yaml value (what --apply writes) is not the sweep's; the space is.
    applied = params_from_dict({**raw, "train": {"epochs": 2, "learning_rate": 0.002}})
    assert sweep_name(applied, {"data_checksum": "a"}) == name
    assert sweep_name(params_from_dict({**raw, "tune": {**raw["tune"], "num_samples": 4}}),
                      {"data_checksum": "a"}) != name
    assert sweep_name(params, {"data_checksum": "b"}) != name


def test_the_first_trial_is_the_params_own_values_when_the_space_holds_them() -> None:
    space = {"train.learning_rate": {"loguniform": [0.0003, 0.003]},
             "train.batch_size": {"choice": [64, 128]},
             "model.hidden_sizes": {"choice": [[256], [512]]}, "train.epochs": 3}
    params = params_from_dict({"tune": {"space": space}})
    assert baseline(params) == {"train.learning_rate": 0.001, "train.batch_size": 128,
                                "model.hidden_sizes": "[512]"}
    for outside in ({"train": {"learning_rate": 0.01}}, {"model": {"hidden_sizes": [64]}},
                    {"tune": {"space": space, "baseline": False}},
                    {"tune": {"space": {**space, "train.seed": {"grid": [1, 2]}}}}):
        assert baseline(params_from_dict({"tune": {"space": space}, **outside})) is None


def _result(trial_id: str, lr: float, epochs: int, acc: float | None, error: str | None = None):
    metrics = {"epoch": epochs, "val_accuracy": acc, "val_loss": 0.5} if epochs else {}
    return SimpleNamespace(path=f"/s/trial_{trial_id}",
                           config={"train.learning_rate": lr, "train.epochs": 3},
                           metrics=metrics, error=RuntimeError(error) if error else None)


def test_the_report_keeps_every_trial_and_picks_the_best_that_ran_in_full() -> None:
    params = params_from_dict(_tune(space={"train.learning_rate": {"choice": [0.1, 0.01]},
                                           "train.epochs": 3}))
    results = [_result("a_00002", 0.1, 1, 0.99),  # stopped early: never the winner
               _result("a_00000", 0.01, 3, 0.90), _result("a_00001", 0.02, 3, 0.90),
               _result("a_00003", 0.5, 0, None, "the loss is not finite at epoch 1")]
    report = build_report(params, results, {"name": "s", "wall_s": 1.0})
    assert [(t["trial_id"], t["status"], t["epochs"]) for t in report["trials"]] == [
        ("a_00000", "completed", 3), ("a_00001", "completed", 3), ("a_00002", "stopped", 1),
        ("a_00003", "error", 0)]
    assert report["trials"][3]["error"] == "the loss is not finite at epoch 1"
    assert report["best"] == {"trial_id": "a_00000", "config": {"train.learning_rate": 0.01,
                                                                 "train.epochs": 3},
                              "val_accuracy": 0.90, "epochs": 3}  # the earlier of a tie
    assert report["sweep"]["trial_epochs_run"] == 7
    assert report["sweep"]["trial_epochs_budget"] == 12
    lines = table_lines(report)
    assert lines[1].startswith("*  a_00000  completed") and "train.learning_rate" in lines[0]
    assert best_trial(report["trials"], "val_loss", "min")["trial_id"] == "a_00000"


# --- real sweeps: Ray Tune on the session's Ray, MLflow on the workspace's SQLite store ---

def _workspace(processed_ws: Path, root: Path, session_ray, tune: dict,
               train: dict | None = None) -> Workspace:
    shutil.copytree(processed_ws / "data", root / "data")
    seed_workspace_store(root)
    (root / "params.yaml").write_text(yaml.safe_dump({
        "model": {"hidden_sizes": [32]},
        "train": {"epochs": 2, "batch_size": 32, "num_workers": 1, "ray_address": "auto",
                  **(train or {})},
        "tune": tune}))
    session_ray.env_file(root / ".ray")  # as `make ray-up` leaves it: the sweep reuses it
    return Workspace.at(root)


def _env() -> dict[str, str]:
    env = venv_env()
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
                "DLTRAIN_RAY_DIR", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def _tune_cmd(ws: Workspace) -> list[str]:
    return [sys.executable, "-m", "dltrain", "tune", "--workspace", str(ws.root)]


def _mlflow_runs(ws: Workspace) -> tuple[list, list]:
    from mlflow import MlflowClient

    from dltrain.tracking.store import EXPERIMENT, embedded_tracking_uri

    client = MlflowClient(tracking_uri=embedded_tracking_uri(ws.root))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    parents = [r for r in runs if r.data.tags.get("dltrain.tune.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("dltrain.tune.role") == "trial"]
    return parents, [(r, client.get_metric_history(r.info.run_id, "val_accuracy"))
                     for r in children]


@pytest.mark.integration
def test_a_sweep_tracks_its_trials_and_asha_stops_the_one_that_cannot_learn(
        processed_ws: Path, tmp_path: Path, session_ray) -> None:
    """4 trials of 2 epochs, one at a time so that the poor trials reach ASHA's first rung
    after a good one: a learning rate that learns, then one that cannot, twice (a grid of two
    values times num_samples 2)."""
    ws = _workspace(processed_ws, tmp_path, session_ray, {
        "num_samples": 2, "grace_period": 1, "max_concurrent_trials": 1,
        "space": {"train.learning_rate": {"grid": [GOOD_LR, BAD_LR]},
                  "model.hidden_sizes": {"choice": [[32], [16]]}}})
    done = subprocess.run(_tune_cmd(ws), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count(" started: ") == 4
    assert len([line for line in out.splitlines() if " completed after 2 of 2 epochs" in line
                or " stopped early by ASHA after 1 of 2 epochs" in line]) == 4
    assert "Configuration for experiment" not in out  # Tune's own console output is off
    assert "dltrain tune --apply-only" in out.splitlines()[-1]

    report = json.loads(ws.tune_report_path.read_text())
    trials = report["trials"]
    assert len(trials) == 4
    by_status = {lr: {t["status"] for t in trials if t["config"]["train.learning_rate"] == lr}
                 for lr in (GOOD_LR, BAD_LR)}
    assert by_status == {GOOD_LR: {"completed"}, BAD_LR: {"stopped"}}
    assert all(t["epochs"] == (2 if t["status"] == "completed" else 1) for t in trials)
    assert all(t["config"]["model.hidden_sizes"] in ([32], [16]) for t in trials)
    assert report["best"]["config"]["train.learning_rate"] == GOOD_LR
    assert report["best"]["val_accuracy"] == max(t["val_accuracy"] for t in trials) > 0.8
    assert report["sweep"]["trial_epochs_run"] == 6
    assert report["sweep"]["trial_epochs_budget"] == 8

    parents, children = _mlflow_runs(ws)
    assert [p.info.run_id for p in parents] == [report["sweep"]["mlflow_run_id"]]
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["best_val_accuracy"] == report["best"]["val_accuracy"]
    assert sorted(r.info.run_id for r, _ in children) == sorted(
        t["mlflow_run_id"] for t in trials)
    for run, history in children:
        trial = next(t for t in trials if t["mlflow_run_id"] == run.info.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["dltrain.tune.status"] == trial["status"]
        assert float(run.data.params["train.learning_rate"]) == \
            trial["config"]["train.learning_rate"]
        assert json.loads(run.data.params["model.hidden_sizes"]) == \
            trial["config"]["model.hidden_sizes"]
        # every epoch, live, step = epoch
        assert [m.step for m in history] == list(range(1, trial["epochs"] + 1))
        assert history[-1].value == pytest.approx(trial["val_accuracy"])
    # A sweep never registers a model.
    from mlflow import MlflowClient

    from dltrain.tracking.store import embedded_tracking_uri

    assert MlflowClient(tracking_uri=embedded_tracking_uri(ws.root)
                        ).search_registered_models() == []


@pytest.mark.integration
def test_an_interrupted_sweep_resumes_without_training_its_finished_trials_again(
        processed_ws: Path, tmp_path: Path, session_ray) -> None:
    ws = _workspace(processed_ws, tmp_path, session_ray, {
        "num_samples": 1, "scheduler": "fifo", "max_concurrent_trials": 1,
        "space": {"train.learning_rate": {"grid": [0.003, 0.002, 0.001]}}})
    proc = subprocess.Popen(_tune_cmd(ws), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    first: list[str] = []
    try:
        for line in proc.stdout:
            first.append(line)
            if "[1/3] trial " in line:
                proc.send_signal(signal.SIGINT)  # Ctrl-C, once a trial has finished
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(first) + rest
    assert proc.returncode == 130, out
    assert "interrupted" in out and "`dltrain tune` resumes sweep" in out
    assert not ws.tune_report_path.exists()
    finished = next(line for line in first if "[1/3] trial " in line).split()[2]

    started = time.perf_counter()
    done = subprocess.run(_tune_cmd(ws), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming sweep" in done.stdout
    assert f"trial {finished} started" not in done.stdout  # kept, not trained again
    assert done.stdout.count(" started: ") == 2
    report = json.loads(ws.tune_report_path.read_text())
    assert sorted(t["status"] for t in report["trials"]) == ["completed"] * 3
    assert finished in [t["trial_id"] for t in report["trials"]]
    parents, children = _mlflow_runs(ws)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one sweep, resumed
    statuses = sorted(r.data.tags.get("dltrain.tune.status", "") for r, _ in children)
    # The trial Ctrl-C stopped has a run of its own, marked; its re-run has another.
    assert statuses.count("completed") == 3 and set(statuses) <= {"completed", "interrupted"}
    assert all(r.info.status != "RUNNING" for r, _ in children)
    assert time.perf_counter() - started < 300
