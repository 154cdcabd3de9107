"""The register stage on a real MLflow SQLite store in tmp_path: lineage, promotion with
aliases, refusals, idempotence, and a tracking server that is down."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.artifacts import download_artifacts
from mlflow.models import Model
from PIL import Image

from dltrain.cli import main
from dltrain.config import Params, params_from_dict
from dltrain.errors import DataError, ModelError, RegistryError
from dltrain.model.classes import FASHION_MNIST
from dltrain.paths import Workspace
from dltrain.registry.candidate import LINEAGE_TAGS
from dltrain.registry.register import read_candidate, register
from dltrain.registry.runlog import model_card_markdown
from dltrain.tracking.runs import flatten
from dltrain.tracking.store import embedded_tracking_uri

from helpers.data import new_test_split
from helpers.mlflow import free_port, serve_mlflow
from helpers.models import evaluated_workspace, plant_model, replace_weights
from helpers.repo import venv_env


def test_flatten_params() -> None:
    flat = flatten(Params().to_dict())
    assert flat["train.epochs"] == "5"
    assert flat["model.hidden_sizes"] == "[512]"
    assert flat["register.tracking_uri"] == "None"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return evaluated_workspace(tmp_path_factory.mktemp("registered"))


@pytest.fixture
def ws(tmp_path: Path, evaluated: Workspace) -> Workspace:
    """A private copy (no registry yet) of the evaluated workspace."""
    shutil.copytree(evaluated.root, tmp_path / "ws")
    return Workspace.at(tmp_path / "ws")


def _params(**register: object) -> Params:
    return params_from_dict({"register": {"min_accuracy": 0.5, **register}})


def _client(ws: Workspace):
    from mlflow import MlflowClient

    uri = embedded_tracking_uri(ws.root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(ws: Workspace) -> str:
    return str(_client(ws).get_model_version_by_alias("mnist-mlp", "champion").version)


@pytest.mark.integration
def test_first_model_is_champion_with_lineage_weights_and_card(ws: Workspace) -> None:
    outcome = register(ws, _params())
    assert json.loads(ws.registration_path.read_text()) == outcome
    assert outcome["registered"] and outcome["new_version"]
    assert str(outcome["version"]) == "1" and outcome["aliases"] == ["champion"]
    assert outcome["tracking_uri"] == embedded_tracking_uri(ws.root)  # inside the repo

    client = _client(ws)
    version = client.get_model_version("mnist-mlp", "1")
    card = json.loads(ws.model_card_path.read_text())
    summary = json.loads((ws.processed_dir / "summary.json").read_text())
    assert set(LINEAGE_TAGS) <= set(version.tags)
    assert version.tags["data_checksum"] == summary["data_checksum"]
    assert version.tags["test_sha256"] == summary["test"]["sha256"]
    assert version.tags["git_commit"] == card["git_commit"]
    assert version.tags["ray_world_size"] == "2" and version.tags["device"] == "cpu"
    assert version.tags["weights_sha256"] == card["weights_sha256"]

    run = client.get_run(outcome["run_id"])
    assert run.data.params["train.epochs"] == "5"
    assert run.data.tags["data_checksum"] == summary["data_checksum"]
    assert run.data.metrics["test_accuracy"] == pytest.approx(outcome["test_accuracy"])
    history = client.get_metric_history(outcome["run_id"], "val/accuracy")
    assert [m.step for m in history] == [1, 2, 3]

    # The version is the run's MLflow model: a pyfunc model from code over the weights and
    # their card, with its signature, input example, requirements and model card; no pickle.
    [output] = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert version.source == logged.artifact_location and str(logged.status) == "READY"
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [
        {"name": "mnist-mlp", "version": "1"}]  # the UI's link from the model to the version
    local = Path(download_artifacts(
        artifact_uri=client.get_model_version_download_uri("mnist-mlp", "1"),
        dst_path=str(ws.root / "dl"), tracking_uri=embedded_tracking_uri(ws.root)))
    assert (local / "artifacts" / "model.safetensors").read_bytes() == ws.model_path.read_bytes()
    assert (local / "artifacts" / "model.json").read_bytes() == ws.model_card_path.read_bytes()
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / flavor["model_code_path"]).name == "pyfunc_model.py"
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt")]
    requirements = (local / "requirements.txt").read_text()
    assert all(f"{lib}==" in requirements for lib in ("mlflow", "numpy", "safetensors"))
    assert "torch" not in requirements
    signature = Model.load(str(local)).signature
    assert signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {
        "dtype": "uint8", "shape": (-1, 28, 28)}}]
    assert signature.outputs.to_dict() == [{"type": "tensor", "tensor-spec": {
        "dtype": "float32", "shape": (-1, 10)}}]
    example = json.loads((local / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]).shape == (2, 28, 28)
    markdown = (local / "model_card.md").read_text()
    for needle in ("## Data", "## Lineage", "## Metrics", "## How to load it",
                   card["git_commit"], summary["data_checksum"],
                   'mlflow.pyfunc.load_model("models:/mnist-mlp@champion")',
                   "mlflow models serve -m models:/mnist-mlp@champion"):
        assert needle in markdown


@pytest.mark.integration
def test_per_class_figures_are_an_artifact_not_metrics(ws: Workspace) -> None:
    """The run page's charts are the epoch curves and the test figures: no one-point chart per
    class. Each class's figures are in reports/per_class.json and the model card's table."""
    outcome = register(ws, _params())
    client = _client(ws)
    run = client.get_run(outcome["run_id"])
    assert {"test_accuracy", "test_loss", "test_macro_f1"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if k.startswith("test_f1")], run.data.metrics
    assert not [k for k in run.data.tags if k == "dltrain.class_names"]
    per_class = json.loads((ws.reports_dir / "per_class.json").read_text())["classes"]
    local = Path(client.download_artifacts(outcome["run_id"], "reports", str(ws.root / "dl")))
    assert {"per_class.json", "training_curves.png"} <= {p.name for p in local.iterdir()}
    logged = json.loads((local / "per_class.json").read_text())["classes"]
    assert [(r["class"], r["f1"]) for r in logged] == [(r["class"], r["f1"]) for r in per_class]
    assert [r["class"] for r in logged] == list(FASHION_MNIST)
    card = model_card_markdown("mnist-mlp", read_candidate(ws), outcome["run_id"])
    assert "| T-shirt/top | `class_0_tshirt_top` |" in card


def test_per_class_figures_of_another_evaluation_are_refused(ws: Workspace) -> None:
    """reports/per_class.json must be of the evaluation metrics.json is (its full checksums):
    else the MLflow run would get another model's per-class figures."""
    path = ws.reports_dir / "per_class.json"
    report = json.loads(path.read_text())
    path.write_text(json.dumps({**report, "weights_sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"per_class.json is stale: .*dltrain evaluate"):
        register(ws, _params())
    path.unlink()
    with pytest.raises(DataError, match=r"per_class.json not found .*dltrain evaluate"):
        register(ws, _params())
    assert not (ws.root / "mlruns").exists()  # MLflow was never touched


def _aliases(ws: Workspace) -> dict[str, str]:
    return {k: str(v) for k, v in _client(ws).get_registered_model("mnist-mlp").aliases.items()}


@pytest.mark.integration
def test_promotion_moves_champion_only_on_improvement(ws: Workspace) -> None:
    replace_weights(ws, seed=1, accuracy=0.90)
    assert register(ws, _params())["aliases"] == ["champion"]

    replace_weights(ws, seed=2, accuracy=0.85)  # worse: challenger, champion stays
    worse = register(ws, _params())
    assert (str(worse["version"]), worse["aliases"]) == ("2", ["challenger"])
    assert "does not beat champion version 1" in worse["reason"]
    assert worse["champion_accuracy"] == 0.90 and worse["champion_rescored"] is False
    assert _champion(ws) == "1"

    replace_weights(ws, seed=3, accuracy=0.905)  # better, but by less than min_improvement
    small = register(ws, _params(min_improvement=0.01))
    assert small["aliases"] == ["challenger"] and _champion(ws) == "1"

    replace_weights(ws, seed=4, accuracy=0.95)  # better: champion moves, the old one is runner-up
    better = register(ws, _params(min_improvement=0.01))
    assert (str(better["version"]), better["aliases"]) == ("4", ["champion"])
    assert str(better["previous_champion_version"]) == "1"
    assert _aliases(ws) == {"champion": "4", "challenger": "1"}
    assert [(e["alias"], e["from_version"], e["to_version"]) for e in better["history"]] == [
        ("champion", 1, 4), ("challenger", 3, 1)]


@pytest.mark.integration
def test_stale_metrics_are_refused_and_nothing_is_registered(ws: Workspace, capsys) -> None:
    """A new model trained while evaluate was skipped: metrics.json still describes the old
    weights (their sha256), so register refuses instead of recording the old accuracy."""
    metrics = json.loads(ws.metrics_path.read_text())
    replace_weights(ws, seed=7)
    ws.metrics_path.write_text(json.dumps(metrics))  # evaluate did not run
    with pytest.raises(DataError, match="metrics.json is stale: it measured weights"):
        register(ws, _params())
    assert main(["register", "--workspace", str(ws.root), "-S", "register.min_accuracy=0.5"]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and "dltrain evaluate" in err and "Traceback" not in err
    assert not ws.registration_path.exists()
    assert not (ws.root / "mlruns").exists()  # MLflow was never touched

    # Metrics of these weights, but measured on another test split than data/processed holds.
    replace_weights(ws, seed=7)
    new_test_split(ws, seed=99)
    with pytest.raises(DataError, match="it measured test split"):
        register(ws, _params())


@pytest.mark.parametrize("where", ["metrics", "card", "training"])
def test_non_finite_figures_are_refused_whatever_min_accuracy(ws: Workspace, capsys,
                                                              where: str) -> None:
    """A diverged training (loss NaN) is not a model: even with min_accuracy 0 it must not
    become champion with "loss": NaN in metrics.json. Refused before MLflow is touched."""
    path = {"metrics": ws.metrics_path, "card": ws.model_card_path,
            "training": ws.training_report_path}[where]
    doc = json.loads(path.read_text())
    if where == "metrics":
        doc["loss"] = float("nan")
    elif where == "card":
        doc.setdefault("final", {})["val_loss"] = float("inf")
    else:
        doc.setdefault("epochs", [{"epoch": 1}])[-1]["train_loss"] = float("nan")
    path.write_text(json.dumps(doc))
    with pytest.raises((DataError, ModelError), match="non-finite|not finite|nan|inf"):
        register(ws, _params(min_accuracy=0.0))
    assert main(["register", "--workspace", str(ws.root), "-S", "register.min_accuracy=0"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not ws.registration_path.exists()
    assert not (ws.root / "mlruns").exists()  # MLflow was never touched


@pytest.mark.integration
def test_a_worse_model_on_a_new_test_set_stays_challenger(ws: Workspace, tmp_path: Path) -> None:
    """The gate with new data: the champion's weights are fetched from the registry and scored
    on the new test set with evaluate's code; a planted worse model loses to that score, and
    both scores and the test checksum are recorded on the version and in registration.json."""
    first = register(ws, _params(min_accuracy=0.0))
    assert first["aliases"] == ["champion"]
    champion_model = ws.model_path.read_bytes(), ws.model_card_path.read_bytes()

    new_sha = new_test_split(ws, seed=41)
    planted = plant_model(ws, seed=5, epochs=0)  # untrained: about chance on the new test set
    outcome = register(ws, _params(min_accuracy=0.0))

    # The oracle: evaluate the champion's own files on the new test set, independently.
    oracle = tmp_path / "oracle"
    (oracle / "models").mkdir(parents=True)
    (oracle / "models" / "model.safetensors").write_bytes(champion_model[0])
    (oracle / "models" / "model.json").write_bytes(champion_model[1])
    from dltrain.evaluate.stage import evaluate

    rescored = evaluate(oracle / "models" / "model.safetensors", ws.processed_dir,
                        oracle / "reports", batch_size=256)["accuracy"]
    assert rescored > planted["accuracy"] + 0.3
    assert (outcome["version"], outcome["aliases"]) == (2, ["challenger"])
    assert outcome["champion_accuracy"] == rescored and outcome["champion_rescored"] is True
    assert outcome["test_accuracy"] == planted["accuracy"] and outcome["test_sha256"] == new_sha
    assert "re-scored on the current test set" in outcome["reason"]
    assert json.loads(ws.registration_path.read_text()) == outcome
    assert _champion(ws) == "1"
    tags = _client(ws).get_model_version("mnist-mlp", "2").tags
    assert float(tags["gate.champion_accuracy"]) == rescored
    assert float(tags["test_accuracy"]) == planted["accuracy"]
    assert tags["test_sha256"] == new_sha and tags["gate.champion_version"] == "1"

    better = plant_model(ws, seed=6, epochs=4)  # trained: beats the re-scored champion
    assert better["accuracy"] >= rescored
    promoted = register(ws, _params(min_accuracy=0.0))
    assert promoted["aliases"] == ["champion"] and promoted["champion_accuracy"] == rescored
    assert _aliases(ws) == {"champion": "3", "challenger": "1"}


def _artifact_files(ws: Workspace, version: str) -> Path:
    """The folder of the version's weights in the store (an MLflow model's artifacts/)."""
    uri = _client(ws).get_model_version_download_uri("mnist-mlp", version)
    return Path(uri.removeprefix("file://")) / "artifacts"


@pytest.mark.integration
def test_a_champion_that_cannot_be_loaded_is_an_error_or_an_explicit_promotion(
        ws: Workspace, capsys) -> None:
    register(ws, _params(min_accuracy=0.0))
    (_artifact_files(ws, "1") / "model.safetensors").unlink()  # the registry lost its weights
    new_test_split(ws, seed=43)
    plant_model(ws, seed=5, epochs=0)
    runs_before = len(_client(ws).search_runs([_client(ws).get_experiment_by_name(
        "mnist-training").experiment_id]))

    with pytest.raises(ModelError, match="champion version 1 of mnist-mlp cannot be scored"):
        register(ws, _params(min_accuracy=0.0))
    client = _client(ws)
    assert [v.version for v in client.search_model_versions("name = 'mnist-mlp'")] in (
        ["1"], [1])
    assert len(client.search_runs([client.get_experiment_by_name(
        "mnist-training").experiment_id])) == runs_before
    assert _champion(ws) == "1"

    args = ["register", "--workspace", str(ws.root), "-S", "register.min_accuracy=0"]
    assert main(args) == 1
    assert "--if-champion-unloadable promote" in capsys.readouterr().err
    assert main([*args, "--if-champion-unloadable", "promote"]) == 0
    outcome = json.loads(ws.registration_path.read_text())
    assert outcome["aliases"] == ["champion"] and _champion(ws) == "2"
    assert "could not be scored" in outcome["reason"] and "promoted as asked" in outcome["reason"]
    assert outcome["history"][0]["reason"] == outcome["reason"]
    assert client.get_model_version("mnist-mlp", "2").tags["gate.promote_unloadable"] == "true"


@pytest.mark.integration
def test_below_min_accuracy_is_not_registered(ws: Workspace) -> None:
    replace_weights(ws, seed=9, accuracy=0.7)
    outcome = register(ws, _params(min_accuracy=0.8))
    assert outcome["registered"] is False and outcome["version"] is None
    assert "below register.min_accuracy" in outcome["reason"]
    assert json.loads(ws.registration_path.read_text())["registered"] is False
    assert _client(ws).search_model_versions("name = 'mnist-mlp'") == []


@pytest.mark.integration
def test_same_weights_twice_make_one_version(ws: Workspace, capsys) -> None:
    first = register(ws, _params())
    assert main(["register", "--workspace", str(ws.root), "-S", "register.min_accuracy=0.5"]) == 0
    second = json.loads(ws.registration_path.read_text())
    assert second["version"] == first["version"] and second["new_version"] is False
    assert second["aliases"] == ["champion"] and "already version 1" in second["reason"]
    assert len(_client(ws).search_model_versions("name = 'mnist-mlp'")) == 1
    out = capsys.readouterr()
    assert "already version 1" in out.out
    assert "alembic" not in out.err and "Creating initial MLflow" not in out.err  # quiet


@pytest.mark.integration
def test_unreachable_server_fails_fast_and_writes_nothing(ws: Workspace, capsys) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RegistryError) as info:
        register(ws, _params(tracking_uri=uri), attempts=3, backoff_s=0.05)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and "after 3 attempts" in message and "models/" in message
    assert not ws.registration_path.exists()
    assert ws.model_path.is_file()  # nothing lost

    code = main(["register", "--workspace", str(ws.root), "-S", f"register.tracking_uri={uri}"])
    assert code == 1 and "unreachable" in capsys.readouterr().err
    assert not ws.registration_path.exists()


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with serve_mlflow(free_port(), tmp_path / "server") as uri:
        yield uri


@pytest.mark.integration
def test_server_down_then_up_registers_once(ws: Workspace, tmp_path: Path, capsys) -> None:
    """Registration while the server is down fails clearly and records nothing; once the same
    server is up, the re-run registers one version, and a third run adds none."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    assert main(["register", "--workspace", str(ws.root), "-S", f"register.tracking_uri={uri}",
                 "-S", "register.min_accuracy=0.5"]) == 1
    err = capsys.readouterr().err
    assert f"MLflow tracking server {uri} is unreachable" in err and "Traceback" not in err
    assert not ws.registration_path.exists()

    with serve_mlflow(port, tmp_path / "server") as served:
        assert served == uri
        first = register(ws, _params(tracking_uri=uri))
        again = register(ws, _params(tracking_uri=uri))
        from mlflow import MlflowClient

        versions = MlflowClient(tracking_uri=uri).search_model_versions("name = 'mnist-mlp'")
        runs = MlflowClient(tracking_uri=uri).search_runs(
            [MlflowClient(tracking_uri=uri).get_experiment_by_name("mnist-training")
             .experiment_id])
    assert (first["version"], first["new_version"], first["aliases"]) == (1, True, ["champion"])
    assert (again["version"], again["new_version"]) == (1, False)
    assert [str(v.version) for v in versions] == ["1"]
    assert len(runs) == 1  # the failed attempt logged nothing
    assert json.loads(ws.registration_path.read_text())["version"] == 1


@pytest.mark.integration
def test_register_and_predict_through_an_mlflow_server(ws: Workspace, mlflow_server: str,
                                                       capsys, monkeypatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("DLTRAIN_MODEL_CACHE", str(tmp_path / "cache"))  # not ~/.cache
    outcome = register(ws, _params(tracking_uri=mlflow_server))
    assert outcome["version"] == 1 and outcome["aliases"] == ["champion"]
    assert register(ws, _params(tracking_uri=mlflow_server))["new_version"] is False

    image = np.load(ws.processed_dir / "test_images.npy")[0]
    label = int(np.load(ws.processed_dir / "test_labels.npy")[0])
    png = ws.root / "one.png"
    Image.fromarray(image, mode="L").save(png)
    capsys.readouterr()
    assert main(["predict", "--model", "models:/mnist-mlp@champion", "--tracking-uri",
                 mlflow_server, "--json", str(png)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["class"] == label
    # Again: the server is asked with one REST request, the weights come from the cache, and
    # MLflow is not imported.
    script = ("import sys; from dltrain.cli import main; code = main(sys.argv[1:]); "
              "print('mlflow' in sys.modules); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", script, "predict", "--model",
                          "models:/mnist-mlp@champion", "--tracking-uri", mlflow_server, str(png)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.integration
def test_a_full_disk_during_register_is_one_line_and_mlflows_tracebacks_go_to_the_log(
        ws: Workspace) -> None:
    """The store on a small tmpfs that fills: the console gets dltrain's one line only, naming
    the log file where MLflow's own error records (with their tracebacks) went."""
    mlruns = ws.root / "mlruns"
    mlruns.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mlruns)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        args = ["dltrain", "register", "-S", "register.min_accuracy=0"]
        first = subprocess.run(args, cwd=ws.root, env=venv_env(), capture_output=True,
                               text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        before = ws.registration_path.read_bytes()
        replace_weights(ws, seed=3, accuracy=0.99)
        free = shutil.disk_usage(mlruns).free
        (mlruns / "filler").write_bytes(b"\0" * free)  # the disk is full

        failed = subprocess.run(args, cwd=ws.root, env=venv_env(), capture_output=True,
                                text=True, timeout=300)
    finally:
        subprocess.run(["umount", "-l", str(mlruns)], check=False)
    out = (failed.stdout + failed.stderr).strip()
    log = ws.reports_dir / "register.log"
    assert failed.returncode == 1
    assert out.count("\n") == 0, out  # one line: no MLflow traceback, no SQL
    assert out.startswith("dltrain register: error: MLflow at ") and "disk is full" in out
    assert str(log) in out
    assert "SQLAlchemy database error" in log.read_text() and "Traceback" in log.read_text()
    assert ws.registration_path.read_bytes() == before


@pytest.mark.integration
def test_a_model_trained_with_an_applied_sweeps_values_names_the_sweep(ws: Workspace,
                                                                        capsys) -> None:
    """params.yaml's tune.applied (written by `dltrain tune --apply`) tags the version with the
    sweep and trial only when the model was trained with exactly the values it applied."""
    trained = json.loads(ws.model_card_path.read_text())["params"]
    applied = {"sweep": "5e1f00d", "trial": "train_fn_3a9c1_00002",
               "values": {"train.learning_rate": trained["train"]["learning_rate"],
                          "model.hidden_sizes": trained["model"]["hidden_sizes"]}}
    other = {**applied, "values": {**applied["values"], "train.learning_rate": 0.0042}}

    def tuned(record: dict) -> Params:
        return params_from_dict({"register": {"min_accuracy": 0.5}, "tune": {"applied": record}})

    stale = register(ws, tuned(other))  # a model trained before the apply
    version = _client(ws).get_model_version("mnist-mlp", str(stale["version"]))
    assert not {k for k in version.tags if k.startswith("dltrain.tune")}, version.tags
    assert stale["tune"] is None
    assert stale["tune_note"] == ("not tagged with sweep 5e1f00d: the model was trained with "
                                  "train.learning_rate 0.001, the sweep applied 0.0042")
    assert stale["tune_note"] in capsys.readouterr().out

    replace_weights(ws, seed=3)  # then trained with the applied values
    outcome = register(ws, tuned(applied))
    assert outcome["tune"] == {"sweep": "5e1f00d", "trial": "train_fn_3a9c1_00002"}
    client = _client(ws)
    version = client.get_model_version("mnist-mlp", str(outcome["version"]))
    assert version.tags["dltrain.tune.sweep"] == "5e1f00d"
    assert version.tags["dltrain.tune.trial"] == "train_fn_3a9c1_00002"
    assert "tuned by sweep 5e1f00d" in capsys.readouterr().out
    # The run records the training's params, not the tune section.
    assert not [k for k in client.get_run(outcome["run_id"]).data.params if k.startswith("tune")]
