"""The mnist-tuning flow (flows/mnist_tuning.py) under Prefect's test harness: the sweep's
summary artifact, applying the winner, and the mnist-training pipeline on the applied params
through real DVC, MLflow and the register stage's tags.

Most tests stand a `dltrain` in for the sweep (it writes a finished sweep's reports/tune.json,
in seconds) and pass every other command, `dltrain tune --apply-only` included, to the real
one; one runs a real two-trial sweep end to end."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from flows import mnist_training as mt
from flows import mnist_tuning as mtune
from flows.summary import tune_summary

from helpers.prefect import run_artifact
from helpers.repo import REPO_ROOT

BEST = {"train.learning_rate": 0.002, "model.hidden_sizes": [64]}
REPORT = {
    "sweep": {"name": "tune-20261207", "mlflow_run_id": "9f00aa11", "experiment": "dltrain",
              "storage": "/tmp/s", "metric": "val_accuracy", "mode": "max", "num_samples": 3,
              "scheduler": "asha", "search": "random", "wall_s": 42.5,
              "trial_epochs_run": 4, "trial_epochs_budget": 6},
    "trials": [
        {"trial_id": "t_00000", "mlflow_run_id": "r0", "status": "stopped", "epochs": 1,
         "config": {**BEST, "train.learning_rate": 0.0001, "model.hidden_sizes": [256]},
         "val_accuracy": 0.31, "val_loss": 2.0},
        {"trial_id": "t_00001", "mlflow_run_id": "r1", "status": "completed", "epochs": 2,
         "config": BEST, "val_accuracy": 0.88, "val_loss": 0.4},
        {"trial_id": "t_00002", "mlflow_run_id": None, "status": "error", "epochs": 0,
         "config": {**BEST, "train.learning_rate": 0.01}, "val_accuracy": None,
         "val_loss": None}],
    "best": {"trial_id": "t_00001", "config": BEST, "val_accuracy": 0.88, "epochs": 2},
}

# `dltrain tune` writes the report; every other command, `dltrain tune --apply-only` included,
# is the real dltrain's.
STAND_IN = """#!/bin/sh
if [ "$1" = tune ] && [ "$2" != --apply-only ]; then
  cp params.yaml {out}/tune-params.yaml; mkdir -p reports; cp {report} reports/tune.json
  echo "sweep: 3 trials"; exit 0
fi
exec {real} "$@"
"""


def test_the_summary_ranks_the_trials_and_names_the_winner():
    text = tune_summary(REPORT, applied=False)
    rows = [line for line in text.splitlines() if line.startswith("| `t_")]
    assert [row.split("`")[1] for row in rows] == ["t_00001", "t_00000", "t_00002"]
    assert rows[0].startswith("| `t_00001` **(best)** | completed | 2 | 0.8800 | `[64]` | "
                              "`0.002` |"), rows[0]
    assert "trial-epochs run: 4 of a budget of 6" in text and "`9f00aa11`" in text
    assert "- `model.hidden_sizes`: `[64]`" in text and "`dltrain tune --apply-only`" in text
    assert "applied to params.yaml" in tune_summary(REPORT, applied=True)
    assert "nothing to apply" in tune_summary({**REPORT, "best": None}, applied=False)


def test_the_pipeline_keeps_the_runs_overrides_but_not_the_sweeps():
    changes = {"tune.num_samples": 4, "train.ray_address": "local", "data.source": "/d"}
    assert mtune.pipeline_overrides(changes) == {"data.source": "/d"}


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch) -> Path:
    """The stand-in `dltrain` first on the PATH of the flow's commands and stages."""
    bin_dir, report = tmp_path / "bin", tmp_path / "tune.json"
    bin_dir.mkdir()
    report.write_text(json.dumps(REPORT))
    real = Path(sys.executable).parent / "dltrain"
    (bin_dir / "dltrain").write_text(STAND_IN.format(out=tmp_path,
                                                     report=report, real=real))
    (bin_dir / "dltrain").chmod(0o755)
    env = mt.stage_env

    def with_stand_in() -> dict[str, str]:
        base = env()
        return {**base, "PATH": f"{bin_dir}{os.pathsep}{base['PATH']}"}

    monkeypatch.setattr(mt, "stage_env", with_stand_in)
    monkeypatch.setattr(mtune, "stage_env", with_stand_in)
    return tmp_path


@pytest.mark.integration
def test_a_sweep_without_apply_leaves_params_and_publishes_the_table(
        prefect_harness, fresh_clone, stand_in, tiny_source):
    before = (fresh_clone / "params.yaml").read_bytes()
    state = mtune.mnist_tuning(workspace=str(fresh_clone), ray_address="local",
                               overrides={"data.source": str(tiny_source), "train.epochs": 2},
                               return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"best": REPORT["best"], "applied": False, "pipeline": None}
    # The data stages ran first (the sweep trains on data/processed); the sweep ran with the
    # run's settings in params.yaml, which is as it was after the run.
    assert (fresh_clone / "data" / "processed" / "summary.json").is_file()
    seen = yaml.safe_load((stand_in / "tune-params.yaml").read_text())
    assert (seen["train"]["epochs"], seen["train"]["ray_address"]) == (2, "local")
    assert (fresh_clone / "params.yaml").read_bytes() == before
    summary = run_artifact("mnist-tuning-summary", state.state_details.flow_run_id).data
    assert summary == tune_summary(REPORT, applied=False)
    assert not (fresh_clone / "models" / "model.safetensors").exists()  # no training


@pytest.mark.integration
def test_apply_writes_the_winner_and_the_pipeline_registers_it_tagged(
        prefect_harness, fresh_clone, stand_in, tiny_source):
    from mlflow import MlflowClient

    state = mtune.mnist_tuning(
        apply=True, workspace=str(fresh_clone), return_state=True,
        overrides={"data.source": tiny_source.as_uri(), "train.num_workers": 0,
                   "train.epochs": 2, "register.min_accuracy": 0.0})
    assert state.is_completed(), state.message
    result = state.result()
    # The data stages ran before the sweep: the pipeline finds them up to date.
    assert result["applied"] and result["pipeline"] == {
        **{s: "ran" for s in mt.STAGES}, "download": "skipped", "preprocess": "skipped"}
    params = yaml.safe_load((fresh_clone / "params.yaml").read_text())
    assert params["train"]["learning_rate"] == 0.002 and params["model"]["hidden_sizes"] == [64]
    assert params["tune"]["applied"] == {"sweep": "9f00aa11", "trial": "t_00001",
                                         "values": BEST}
    # The pipeline trained the applied values (the run's own overrides put back after it).
    card = json.loads((fresh_clone / "models" / "model.json").read_text())
    assert card["params"]["model"]["hidden_sizes"] == [64]
    assert card["params"]["train"]["learning_rate"] == 0.002
    reg = json.loads((fresh_clone / "reports" / "registration.json").read_text())
    assert reg["tune"] == {"sweep": "9f00aa11", "trial": "t_00001"}, reg
    version = MlflowClient(tracking_uri=reg["tracking_uri"]).get_model_version(
        reg["model_name"], str(reg["version"]))
    assert version.tags["dltrain.tune.sweep"] == "9f00aa11"
    assert version.tags["dltrain.tune.trial"] == "t_00001"
    assert "applied to params.yaml" in run_artifact("mnist-tuning-summary",
                                                    state.state_details.flow_run_id).data


@pytest.mark.integration
def test_a_failed_sweep_fails_the_run_in_one_line_and_applies_nothing(
        prefect_harness, fresh_clone, stand_in, tiny_source):
    before = (fresh_clone / "params.yaml").read_bytes()
    script = stand_in / "bin" / "dltrain"
    script.write_text(script.read_text().replace(
        '  cp params.yaml', '  echo "dltrain tune: error: unknown key tune.space x" >&2\n'
        '  exit 2\n  cp params.yaml'))
    state = mtune.mnist_tuning(apply=True, workspace=str(fresh_clone), return_state=True,
                               overrides={"data.source": str(tiny_source)})
    assert state.is_failed()
    assert state.message == ("`dltrain tune` failed (exit 2): dltrain tune: error: unknown key "
                             "tune.space x"), state.message
    assert (fresh_clone / "params.yaml").read_bytes() == before
    assert not (fresh_clone / "reports" / "tune.json").exists()


@pytest.mark.integration
def test_a_real_sweep_then_the_pipeline_registers_its_winner_tagged(
        prefect_harness, fresh_clone, tiny_source, session_ray):
    """`dltrain tune` itself: two trials of two epochs on the session's Ray (the workspace's
    warm Ray, as `make ray-up` records it), then the winner applied and the pipeline run."""
    from mlflow import MlflowClient

    session_ray.env_file(fresh_clone / ".ray")
    space = {"train.learning_rate": {"grid": [0.003, 0.0003]}, "train.epochs": 2}
    state = mtune.mnist_tuning(apply=True, workspace=str(fresh_clone), return_state=True,
                               overrides={"data.source": str(tiny_source),
                                          "train.num_workers": 0, "model.hidden_sizes": [16],
                                          "register.min_accuracy": 0.0, "tune.space": space,
                                          "tune.num_samples": 1})
    assert state.is_completed(), state.message
    report = json.loads((fresh_clone / "reports" / "tune.json").read_text())
    assert sorted(t["config"]["train.learning_rate"] for t in report["trials"]) == [0.0003,
                                                                                    0.003]
    best = report["best"]
    assert state.result()["best"] == best
    assert state.result()["pipeline"]["register"] == "ran"
    params = yaml.safe_load((fresh_clone / "params.yaml").read_text())
    assert params["tune"]["applied"] == {"sweep": report["sweep"]["mlflow_run_id"],
                                         "trial": best["trial_id"], "values": best["config"]}
    repo = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert params["tune"]["space"] == repo["tune"]["space"]  # the run's own was put back
    reg = json.loads((fresh_clone / "reports" / "registration.json").read_text())
    version = MlflowClient(tracking_uri=reg["tracking_uri"]).get_model_version(
        reg["model_name"], str(reg["version"]))
    assert version.tags["dltrain.tune.sweep"] == report["sweep"]["mlflow_run_id"]
    assert version.tags["dltrain.tune.trial"] == best["trial_id"]
