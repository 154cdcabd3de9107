"""The register stage on a real MLflow SQLite store in tmp_path: lineage, promotion with
aliases, refusals, idempotence, and a tracking server that is down."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_models import evaluated_workspace, replace_weights
from PIL import Image

from dltrain.cli import main
from dltrain.config import Params, params_from_dict
from dltrain.errors import RegistryError
from dltrain.paths import Workspace
from dltrain.register import LINEAGE_TAGS, decide_promotion, flatten, register
from dltrain.registry import embedded_tracking_uri

SHA = "a" * 64


@pytest.mark.parametrize(("accuracy", "sha", "champion", "min_improvement", "promote", "why"), [
    (0.90, SHA, None, 0.0, True, "no champion yet"),
    (0.91, SHA, {"test_accuracy": "0.90", "test_sha256": SHA}, 0.0, True, "beats"),
    (0.90, SHA, {"test_accuracy": "0.90", "test_sha256": SHA}, 0.0, True, "beats"),
    (0.89, SHA, {"test_accuracy": "0.90", "test_sha256": SHA}, 0.0, False, "does not beat"),
    (0.905, SHA, {"test_accuracy": "0.90", "test_sha256": SHA}, 0.01, False, "does not beat"),
    (0.91, SHA, {"test_accuracy": "0.90", "test_sha256": SHA}, 0.01, True, "beats"),
    (0.50, SHA, {"test_accuracy": "0.99", "test_sha256": "b" * 64}, 0.0, True,
     "different test data"),
])
def test_decide_promotion(accuracy: float, sha: str, champion: dict | None,
                          min_improvement: float, promote: bool, why: str) -> None:
    if champion:
        champion = {**champion, "version": "1"}
    decided, reason = decide_promotion(accuracy, sha, champion, min_improvement)
    assert decided is promote
    assert why in reason


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
    history = client.get_metric_history(outcome["run_id"], "val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]

    files = {a.path for a in client.list_artifacts(outcome["run_id"], "model")}
    assert files == {"model/model.pt", "model/model.json", "model/model_card.md"}  # no MLmodel
    local = Path(client.download_artifacts(outcome["run_id"], "model", str(ws.root / "dl")))
    assert (local / "model.pt").read_bytes() == ws.model_path.read_bytes()
    markdown = (local / "model_card.md").read_text()
    for needle in ("## Data", "## Lineage", "## Metrics", "## How to load it",
                   card["git_commit"], summary["data_checksum"], "weights_only=True"):
        assert needle in markdown


@pytest.mark.integration
def test_promotion_moves_champion_only_on_improvement(ws: Workspace) -> None:
    base = json.loads(ws.metrics_path.read_text())
    replace_weights(ws, seed=1, accuracy=0.90)
    assert register(ws, _params())["aliases"] == ["champion"]

    replace_weights(ws, seed=2, accuracy=0.85)  # worse: challenger, champion stays
    worse = register(ws, _params())
    assert (str(worse["version"]), worse["aliases"]) == ("2", ["challenger"])
    assert "does not beat champion version 1" in worse["reason"]
    assert _champion(ws) == "1"

    replace_weights(ws, seed=3, accuracy=0.905)  # better, but by less than min_improvement
    small = register(ws, _params(min_improvement=0.01))
    assert small["aliases"] == ["challenger"] and _champion(ws) == "1"

    replace_weights(ws, seed=4, accuracy=0.95)  # better: champion moves
    better = register(ws, _params(min_improvement=0.01))
    assert (str(better["version"]), better["aliases"]) == ("4", ["champion"])
    assert str(better["previous_champion_version"]) == "1" and _champion(ws) == "4"

    # A champion evaluated on other test data does not compare: the new model takes over.
    replace_weights(ws, seed=5, accuracy=0.60, test_sha256="c" * 64)
    other = register(ws, _params())
    assert other["aliases"] == ["champion"] and "different test data" in other["reason"]
    assert base["test_sha256"] != "c" * 64


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


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_unreachable_server_fails_fast_and_writes_nothing(ws: Workspace, capsys) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
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


@contextlib.contextmanager
def serve_mlflow(port: int, store: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1:`port` with its SQLite store in `store`; stopped
    when the block ends, pass or fail."""
    store.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    with serve_mlflow(_closed_port(), tmp_path / "server") as uri:
        yield uri


@pytest.mark.integration
def test_server_down_then_up_registers_once(ws: Workspace, tmp_path: Path, capsys) -> None:
    """Registration while the server is down fails clearly and records nothing; once the same
    server is up, the re-run registers one version, and a third run adds none."""
    port = _closed_port()
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
                                                       capsys) -> None:
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
