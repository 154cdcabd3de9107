"""`dltrain predict`: PNG and IDX inputs, --json, models:/ references through a real MLflow
SQLite registry, and refusal of undecodable images and of model files that are not weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dltrain.cli import main
from dltrain.config import params_from_dict
from dltrain.data.idx import write_idx
from dltrain.errors import DataError
from dltrain.model.classes import FASHION_MNIST
from dltrain.model.weights import load_weights
from dltrain.paths import Workspace
from dltrain.registry.predict import load_inputs, predict_command
from dltrain.registry.register import register
from dltrain.tracking.store import embedded_tracking_uri

from helpers.models import evaluated_workspace
from helpers.payload import Payload
from helpers.repo import venv_env

N_PNG = 6


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return evaluated_workspace(tmp_path_factory.mktemp("predict"))


@pytest.fixture(scope="module")
def test_set(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    return (np.load(ws.processed_dir / "test_images.npy"),
            np.load(ws.processed_dir / "test_labels.npy"))


@pytest.fixture(scope="module")
def pngs(ws: Workspace, test_set) -> list[Path]:
    """The first test images as 28x28 grey PNGs."""
    images, _ = test_set
    paths = []
    for i in range(N_PNG):
        path = ws.root / "inputs" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(images[i], mode="L").save(path)
        paths.append(path)
    return paths


def test_png_inputs_get_their_true_class(ws: Workspace, pngs: list[Path], test_set,
                                         capsys: pytest.CaptureFixture) -> None:
    results = predict_command(str(ws.model_path), pngs, as_json=False, tracking_uri=None)
    _, labels = test_set
    assert [r["class"] for r in results] == labels[:N_PNG].tolist()
    assert all(0.1 < r["probability"] <= 1.0 for r in results)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == N_PNG
    first = FASHION_MNIST[labels[0]]
    assert lines[0].startswith(f"{pngs[0]}: {labels[0]} {first} (") and lines[0].endswith("%)")


def test_json_output_shape(ws: Workspace, pngs: list[Path], test_set,
                           capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "--model", str(ws.model_path), "--json", *map(str, pngs)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert isinstance(printed, list) and len(printed) == N_PNG
    for entry, path, label in zip(printed, pngs, test_set[1], strict=False):
        assert {"path", "class", "probability"} <= set(entry)
        assert entry["path"] == str(path) and entry["class"] == int(label)
        assert isinstance(entry["probability"], float)


def test_any_size_and_mode_is_converted(ws: Workspace, test_set, tmp_path: Path) -> None:
    images, labels = test_set
    rgb = Image.fromarray(images[7], mode="L").resize((84, 84), Image.Resampling.NEAREST)
    path = tmp_path / "big.png"
    rgb.convert("RGB").save(path)
    names, arrays = load_inputs([path])
    assert arrays.shape == (1, 28, 28) and arrays.dtype == np.uint8
    [result] = predict_command(str(ws.model_path), [path], as_json=True, tracking_uri=None)
    assert result["class"] == int(labels[7])


def test_idx_file_gives_one_entry_per_image(ws: Workspace, test_set, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    images, labels = test_set
    idx = tmp_path / "batch.idx"
    write_idx(idx, images[:5])
    assert main(["predict", "--model", str(ws.model_path), "--json", str(idx)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [e["path"] for e in printed] == [f"{idx}[{i}]" for i in range(5)]
    assert [e["class"] for e in printed] == labels[:5].tolist()


@pytest.mark.integration
def test_registry_reference_resolves_the_champion(ws: Workspace, pngs: list[Path], test_set,
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    copy = Workspace.at(tmp_path / "ws")
    shutil.copytree(ws.root, copy.root)
    register(copy, params_from_dict({"register": {"min_accuracy": 0.5}}))
    capsys.readouterr()
    uri = embedded_tracking_uri(copy.root)
    assert main(["predict", "--model", "models:/mnist-mlp@champion", "--tracking-uri", uri,
                 "--json", *map(str, pngs)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [e["class"] for e in printed] == test_set[1][:N_PNG].tolist()

    assert main(["predict", "--model", "models:/mnist-mlp@nobody", "--tracking-uri", uri,
                 str(pngs[0])]) == 1
    err = capsys.readouterr().err
    assert "models:/mnist-mlp@nobody" in err and "no such model version" in err


@pytest.mark.parametrize("payload", [
    b"\x89PNG\r\n\x1a\nthis is not image data",
    b"plain text, not an image",
])
def test_undecodable_image_is_a_clear_error(ws: Workspace, tmp_path: Path, payload: bytes,
                                            capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(payload)
    with pytest.raises(DataError, match="cannot decode"):
        load_inputs([bad])
    assert main(["predict", "--model", str(ws.model_path), str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "cannot decode the image" in err


def test_truncated_png_is_refused(ws: Workspace, pngs: list[Path], tmp_path: Path) -> None:
    cut = tmp_path / "cut.png"
    cut.write_bytes(pngs[0].read_bytes()[:60])
    with pytest.raises(DataError, match="cannot decode"):
        load_inputs([cut])


def test_pickle_payload_is_refused_and_never_runs(ws: Workspace, pngs: list[Path],
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"
    model_path = tmp_path / "model.pt"
    state = {k: torch.from_numpy(v.copy()) for k, v in load_weights(ws.model_path)[0].items()}
    torch.save({**state, "extra": Payload(marker)}, model_path)
    shutil.copy(ws.model_card_path, tmp_path / "model.json")
    assert not marker.exists()

    assert main(["predict", "--model", str(model_path), str(pngs[0])]) == 1
    err = capsys.readouterr().err
    assert "not plain weights" in err and str(model_path) in err
    assert not marker.exists()


def test_missing_model_is_a_clear_error(pngs: list[Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    assert main(["predict", "--model", str(tmp_path / "none.safetensors"), str(pngs[0])]) == 1
    assert "none.json" in capsys.readouterr().err


def test_a_directory_input_says_so(ws: Workspace, pngs: list[Path],
                                   capsys: pytest.CaptureFixture) -> None:
    folder = pngs[0].parent
    assert main(["predict", "--model", str(ws.model_path), str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"{folder}: is a directory" in err and "*.png" in err


def test_a_reader_that_stops_early_ends_predict_quietly(ws: Workspace, test_set,
                                                        tmp_path: Path) -> None:
    """`dltrain predict ... | head -1`: no BrokenPipeError traceback, the SIGPIPE status."""
    images, labels = test_set
    idx = tmp_path / "many-idx3-ubyte"
    write_idx(idx, np.repeat(images[:50], 40, axis=0))  # 2,000 lines: more than a pipe holds
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dltrain"), "predict", "--model",
                             str(ws.model_path), str(idx)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=venv_env())
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -1` does after its line
    _, err = proc.communicate(timeout=120)
    assert first.strip()
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
