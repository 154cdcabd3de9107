"""DVC experiments are tracked, never promoted: inside `dvc exp run` (DVC_EXP_NAME in the stage's
environment) register completes the MLflow run, tags it with the experiment and registers
nothing; the embedded store of an experiment run in a temporary copy is the repository's own."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml

from dltrain.atomic import read_json
from dltrain.config import params_from_dict
from dltrain.paths import Workspace, experiment_origin
from dltrain.registry.mlflow_model import run_model
from dltrain.registry.register import register
from dltrain.tracking.runs import EXPERIMENT_TAG
from dltrain.tracking.store import EXPERIMENT, embedded_tracking_uri
from dltrain.train.connect import ray_dir

from helpers.data import write_raw_dir
from helpers.models import evaluated_workspace, replace_weights
from helpers.repo import make_clone, venv_env

MODEL = "mnist-mlp"


def _client(root: Path):
    from mlflow import MlflowClient

    uri = embedded_tracking_uri(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _registry(client) -> tuple[list[str], dict[str, str]]:
    """The versions of the model and its aliases (alias -> version)."""
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    aliases = client.get_registered_model(MODEL).aliases
    return versions, {alias: str(version) for alias, version in aliases.items()}


# --- where an experiment's runs go -------------------------------------------------------------

def test_an_experiment_in_a_copy_stands_for_the_repository_it_came_from(tmp_path: Path) -> None:
    repo, copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp123"
    (repo / ".dvc").mkdir(parents=True)
    (copy / ".dvc").mkdir(parents=True)
    (copy / "sub").mkdir()
    inside = {"DVC_EXP_NAME": "tiny", "DVC_ROOT": str(repo)}
    assert experiment_origin(copy, inside) == repo.resolve()
    assert experiment_origin(copy / "sub", inside) == repo.resolve() / "sub"
    # `dvc exp run` in the workspace: DVC_ROOT is the workspace itself.
    assert experiment_origin(repo, inside) == repo.resolve()
    # Not in an experiment (a plain `dvc repro` sets DVC_ROOT too), or no DVC_ROOT: root itself.
    assert experiment_origin(copy, {"DVC_ROOT": str(repo)}) == copy
    assert experiment_origin(copy, {"DVC_EXP_NAME": "tiny"}) == copy
    assert embedded_tracking_uri(copy) == f"sqlite:///{copy.resolve()}/mlruns/mlflow.db"
    # The warm Ray that `make ray-up` recorded in the repository serves its experiments too.
    assert ray_dir(Workspace.at(copy), inside) == repo.resolve() / ".ray"
    assert ray_dir(Workspace.at(copy), {}) == copy / ".ray"


# --- register inside an experiment, in-process ---------------------------------------------------

@pytest.mark.integration
def test_register_in_an_experiment_logs_the_run_and_registers_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    ws = evaluated_workspace(tmp_path / "ws")
    params = params_from_dict({"register": {"min_accuracy": 0.5}})
    first = register(ws, params)
    assert first["registered"] and str(first["version"]) == "1"
    client = _client(ws.root)
    before = _registry(client)
    assert before == (["1"], {"champion": "1"})

    sha = replace_weights(ws, seed=1, accuracy=0.99)  # would be a better champion
    monkeypatch.setenv("DVC_EXP_NAME", "tiny-lr")
    capsys.readouterr()
    outcome = register(ws, params)

    assert _registry(client) == before
    assert outcome["registered"] is False and outcome["version"] is None
    assert outcome["reason"] == "experiment tiny-lr: not registered"
    assert outcome["experiment"] == "tiny-lr" and outcome["aliases"] == []
    assert read_json(ws.registration_path) == outcome
    run = client.get_run(outcome["run_id"])
    assert run.data.tags[EXPERIMENT_TAG] == "tiny-lr"
    assert run.data.tags["dltrain.registered"] == "false"
    assert run.data.metrics["test_accuracy"] == pytest.approx(0.99)
    assert run.info.status == "FINISHED"
    assert run_model(client, run.info.run_id, sha) is not None  # the model, as an artifact
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert "experiment tiny-lr" in line and "not registered" in line
    assert "`dvc exp apply tiny-lr`, then `dvc repro -f -s register`" in line


# --- a real `dvc exp run --temp` in a clone ------------------------------------------------------

def _dvc(clone: Path, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=clone, env=venv_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
def test_dvc_exp_run_temp_tracks_the_experiment_and_leaves_registry_and_workspace(
        tmp_path: Path) -> None:
    clone = make_clone(tmp_path / "clone")
    source = write_raw_dir(tmp_path / "source", n_train=300, n_test=100)
    params_path = clone / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["data"]["source"] = str(source)
    params["model"]["hidden_sizes"] = [16]
    params["train"].update(epochs=2, batch_size=64, num_workers=0)
    params["register"]["min_accuracy"] = 0.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc(clone, "repro")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git + ["add", "-A"], cwd=clone, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "baseline"], cwd=clone, check=True)
    client = _client(clone)
    before = _registry(client)
    assert before == (["1"], {"champion": "1"})
    workspace = {p: _sha(clone / p) for p in ("params.yaml", "models/model.safetensors",
                                              "reports/registration.json", "dvc.lock")}

    out = _dvc(clone, "exp", "run", "--temp", "-n", "one-epoch",
               "-S", "train.epochs=1", "-S", "train.num_workers=0")

    assert "register: experiment one-epoch:" in out and "not registered" in out
    assert _registry(client) == before  # no version, no alias moved
    assert {p: _sha(clone / p) for p in workspace} == workspace  # --temp: workspace untouched
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                              f"tags.`{EXPERIMENT_TAG}` = 'one-epoch'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.epochs"] == "1"
    assert {"test_accuracy", "test_loss", "val/accuracy"} <= set(run.data.metrics)
    assert run.data.tags["dltrain.registered"] == "false"

    # Applied, the experiment reaches the registry from a run on the workspace.
    _dvc(clone, "exp", "apply", "one-epoch")
    applied = read_json(clone / "reports" / "registration.json")
    assert applied["registered"] is False
    assert applied["reason"] == "experiment one-epoch: not registered"
    assert applied["run_id"] == run.info.run_id
    _dvc(clone, "repro", "-f", "-s", "register")
    promoted = read_json(clone / "reports" / "registration.json")
    assert promoted["registered"] and str(promoted["version"]) == "2"
    assert promoted["weights_sha256"] == applied["weights_sha256"]
    assert _registry(client)[0] == ["1", "2"]
