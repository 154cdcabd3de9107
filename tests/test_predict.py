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

from helpers.models import evaluated_workspace, write_params
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
    assert "aliases of mnist-mlp: @champion (version 1)" in err


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
    err = capsys.readouterr().err
    assert f"model file not found: {tmp_path / 'none.safetensors'};" in err


def test_a_missing_model_path_is_named_as_given_with_a_fix_that_fits(
        pngs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """A path outside the workspace's models/: DVC cannot restore it, so no `dvc checkout`."""
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", "elsewhere/nothere.safetensors", str(pngs[0])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dltrain predict: error: model file not found: "
                          f"elsewhere/nothere.safetensors (relative to {tmp_path}); ")
    assert "nothere.json" not in err and "dvc checkout" not in err
    assert len(err.strip().splitlines()) == 1

    # Weights without their card: the card is named, as the user would spell it.
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(pngs[0], tmp_path / "elsewhere" / "nothere.safetensors")
    assert main(["predict", "--model", "elsewhere/nothere.safetensors", str(pngs[0])]) == 1
    err = capsys.readouterr().err
    assert ("elsewhere/nothere.safetensors has no model card beside it: elsewhere/nothere.json "
            f"(relative to {tmp_path}) is missing") in err
    assert "dvc checkout" not in err


def test_the_workspace_model_missing_advises_restoring_it(
        pngs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(pngs[0])]) == 1
    err = capsys.readouterr().err
    assert (f"model file not found: models/model.safetensors (the default model, in {tmp_path});"
            " restore it from DVC's cache (`dvc checkout models`)") in err


def test_outside_the_workspace_predict_says_so_and_C_names_it(
        ws: Workspace, pngs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Run elsewhere, the model that exists in the workspace is not called missing: predict
    says the folder is no workspace and how to name one (-C), and -C DIR works from there."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(pngs[0], tmp_path / "digit.png")
    assert main(["predict", "digit.png"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a dltrain workspace" in err and "-C DIR" in err
    assert "dvc checkout" not in err and "not found" not in err

    for flag in ("-C", "--workspace"):
        assert main(["predict", flag, str(ws.root), "--json", "digit.png"]) == 0
        [result] = json.loads(capsys.readouterr().out)
        assert result["path"] == "digit.png"  # inputs stay relative to the current directory

    # In a folder inside a workspace, the workspace above is named.
    monkeypatch.chdir(pngs[0].parent)
    assert main(["predict", pngs[0].name]) == 1
    assert f"pass `-C {ws.root}`" in capsys.readouterr().err


def test_one_unreadable_input_costs_only_its_own_result(
        ws: Workspace, pngs: list[Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"plain text, not an image")
    missing = tmp_path / "missing.png"
    assert main(["predict", "--model", str(ws.model_path), str(pngs[0]), str(bad),
                 str(pngs[1])]) == 1
    out, err = capsys.readouterr()
    assert [line.split(":")[0] for line in out.splitlines()] == [str(pngs[0]), str(pngs[1])]
    assert err.startswith(f"dltrain predict: error: {bad}: cannot decode the image")

    assert main(["predict", "--model", str(ws.model_path), "--json", str(bad), str(pngs[2]),
                 str(missing)]) == 1
    out, err = capsys.readouterr()
    assert [r["path"] for r in json.loads(out)] == [str(pngs[2])]
    assert "2 of 3 inputs could not be read" in err and str(bad) in err
    assert f"{missing}: input not found" in err


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
