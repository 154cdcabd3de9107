"""The registered version as an MLflow model, through MLflow's own API on a real SQLite store:
`mlflow.pyfunc.load_model` in a fresh interpreter, `mlflow models serve` answering HTTP on
loopback, and `dltrain predict`'s local cache of the version the alias points to."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from dltrain.cli import main
from dltrain.config import params_from_dict
from dltrain.data.idx import write_idx
from dltrain.paths import Workspace
from dltrain.registry import cache as model_cache
from dltrain.registry.mlflow_model import model_code
from dltrain.registry.predict import predict_command
from dltrain.registry.register import register
from dltrain.tracking.store import embedded_tracking_uri

from helpers.mlflow import free_port
from helpers.models import evaluated_workspace, replace_weights
from helpers.repo import venv_env

N_IMAGES = 20
REF = "models:/mnist-mlp@champion"


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = evaluated_workspace(tmp_path_factory.mktemp("mlflow-model"))
    register(ws, params_from_dict({"register": {"min_accuracy": 0.5}}))
    return ws


@pytest.fixture(scope="module")
def images(registered: Workspace) -> tuple[Path, np.ndarray, np.ndarray]:
    """The first test images as an IDX file (for dltrain predict) and an array, and labels."""
    images = np.load(registered.processed_dir / "test_images.npy")[:N_IMAGES]
    labels = np.load(registered.processed_dir / "test_labels.npy")[:N_IMAGES]
    path = registered.root / "inputs" / "test-images.idx"
    path.parent.mkdir(exist_ok=True)
    write_idx(path, images)
    np.save(registered.root / "inputs" / "images.npy", images)
    return path, images, labels


def _dltrain_classes(ws: Workspace, idx: Path) -> list[int]:
    results = predict_command(REF, [idx], as_json=True,
                              tracking_uri=embedded_tracking_uri(ws.root))
    return [r["class"] for r in results]


LOAD_SCRIPT = """
import json, sys
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/mnist-mlp@champion")
probs = model.predict(np.load(sys.argv[2]))
print(json.dumps({"classes": probs.argmax(axis=1).tolist(), "dtype": str(probs.dtype),
                  "shape": list(probs.shape), "sums": probs.sum(axis=1).tolist(),
                  "torch": "torch" in sys.modules,
                  "dltrain_from": sys.modules["dltrain.model.weights"].__file__}))
"""


def test_model_code_ships_what_the_pyfunc_imports_and_no_training_code(tmp_path: Path) -> None:
    package = model_code(tmp_path)
    shipped = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    # What loading runs: the pyfunc's imports and theirs, at any depth.
    assert {"model/weights.py", "model/architecture.py", "registry/mlflow_model.py", "errors.py",
            "__init__.py"} <= shipped
    # Not the training, Ray, tracking or register code, nor the pyfunc file itself (MLflow
    # logs that as the model's python_model).
    assert not any(p.startswith(("train/", "tracking/", "data/")) for p in shipped), shipped
    assert not {"registry/register.py", "registry/pyfunc_model.py", "cli.py"} & shipped, shipped


@pytest.mark.integration
def test_pyfunc_load_model_in_a_fresh_interpreter_gives_dltrains_classes(
        registered: Workspace, images, tmp_path: Path, capsys) -> None:
    idx, array, labels = images
    out = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, embedded_tracking_uri(registered.root),
         str(registered.root / "inputs" / "images.npy")],
        cwd=tmp_path, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["dtype"] == "float32" and answer["shape"] == [N_IMAGES, 10]
    assert np.allclose(answer["sums"], 1.0, atol=1e-5)
    assert answer["torch"] is False  # served without torch
    # The model's own code: the dltrain that travelled with it, not the one installed here.
    assert "/code/dltrain/model/weights.py" in answer["dltrain_from"]
    assert answer["classes"] == _dltrain_classes(registered, idx) == labels.tolist()


@pytest.mark.integration
def test_mlflow_models_serve_answers_invocations_with_the_right_classes(
        registered: Workspace, images, tmp_path: Path) -> None:
    idx, array, labels = images
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", REF, "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            env=venv_env(MLFLOW_TRACKING_URI=embedded_tracking_uri(registered.root)))
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", method="POST",
            data=json.dumps({"inputs": array.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        # 784-vectors: a one-column frame of flat rows, which MLflow reshapes to the signature.
        flat = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", method="POST",
            data=json.dumps({"dataframe_split": {"columns": ["pixels"], "data": [
                [row] for row in array.reshape(N_IMAGES, -1).tolist()]}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(flat, timeout=60) as response:
            flat_answer = json.load(response)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    probs = np.asarray(answer["predictions"])
    assert probs.shape == (N_IMAGES, 10)
    assert probs.argmax(axis=1).tolist() == _dltrain_classes(registered, idx) == labels.tolist()
    assert np.allclose(np.asarray(flat_answer["predictions"]), probs)


@pytest.mark.integration
def test_predict_uses_its_cache_until_the_store_changes(
        registered: Workspace, images, tmp_path: Path, monkeypatch) -> None:
    """The second call answers without importing MLflow; an alias moved since (a write to
    the store) is followed at once."""
    import shutil

    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(registered.root, ws.root)
    # A copy: its store records the original's artifact folder until it is relocated.
    assert main(["registry", "relocate", "--workspace", str(ws.root)]) == 0
    uri = embedded_tracking_uri(ws.root)
    monkeypatch.setattr(model_cache, "STAMP_MARGIN_S", 0.0)  # no wait for a settled store
    first_sha = json.loads(ws.model_card_path.read_text())["weights_sha256"]
    _state, card = model_cache.fetch(REF, uri)
    assert card["weights_sha256"] == first_sha

    idx, _array, labels = images
    script = ("import sys; from dltrain.cli import main; "
              "code = main(['predict', '--json', '--model', sys.argv[1], '--tracking-uri', "
              "sys.argv[2], sys.argv[3]]); print('mlflow' in sys.modules); sys.exit(code)")
    out = subprocess.run([sys.executable, "-c", script, REF, uri, str(idx)], cwd=tmp_path,
                         env=venv_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "False"  # answered from the cache
    printed = json.loads(out.stdout[:out.stdout.rindex("]") + 1])
    assert [r["class"] for r in printed] == labels.tolist()

    # Another version, made champion through MLflow's own API: the cache must not answer
    # with the old one.
    second_sha = replace_weights(ws, seed=3)
    outcome = register(ws, params_from_dict({"register": {"min_accuracy": 0.5}}))
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
        "mnist-mlp", "champion", str(outcome["version"]))
    _state, card = model_cache.fetch(REF, uri)
    assert card["weights_sha256"] == second_sha != first_sha

    # A cached file that is not the registry's bytes any more is fetched again.
    [cached] = (model_cache.cache_root(uri) / "weights" / second_sha).glob("model.safetensors")
    cached.write_bytes(cached.read_bytes()[:-4] + b"\0\0\0\0")
    _state, card = model_cache.fetch(REF, uri)
    assert card["weights_sha256"] == second_sha
    assert model_cache.cached("mnist-mlp", "champion", uri) is not None
