"""dltrain.model.weights: safetensors weights read with numpy give exactly torch's arrays, its
forward pass gives the torch MLP's logits, its checks say what load_model says, a crafted file
is refused with one line naming the file and the cause before safetensors reads it, a pickle is
never loaded, and the stages that read weights never import torch."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dltrain.cli import main
from dltrain.errors import ModelError
from dltrain.model.architecture import INPUT_SIZE, NUM_CLASSES, architecture, expected_shapes
from dltrain.model.mlp import MLP, normalize
from dltrain.model.torchio import load_model, save_model
from dltrain.model.weights import (
    MAX_HEADER_BYTES,
    load_weights,
    load_weights_and_digest,
    mlp_logits,
    sha256_file,
)
from dltrain.paths import Workspace

from helpers.models import make_trained_workspace
from helpers.payload import Payload
from helpers.repo import REPO_ROOT

HIDDEN_SIZES = [(), (32,), (512,), (64, 32)]


def save_mlp(path: Path, hidden: tuple[int, ...], seed: int = 0) -> MLP:
    """A randomly initialised MLP saved as the train stage saves it (weights + card)."""
    torch.manual_seed(seed)
    mlp = MLP(hidden)
    save_model(mlp.state_dict(), {"architecture": architecture(hidden)}, path)
    return mlp


# ------------------------------------------------------------------- same values as torch

def test_constants_and_shapes_are_the_torch_models() -> None:
    first, last = MLP((32,)).net[0], MLP((32,)).net[-1]
    assert (first.in_features, last.out_features) == (INPUT_SIZE, NUM_CLASSES)
    for hidden in HIDDEN_SIZES:
        assert expected_shapes(hidden) == {
            k: tuple(v.shape) for k, v in MLP(hidden).state_dict().items()}


@pytest.mark.parametrize("hidden", HIDDEN_SIZES, ids=str)
def test_round_trip_gives_the_torch_models_arrays(tmp_path: Path,
                                                  hidden: tuple[int, ...]) -> None:
    path = tmp_path / "model.safetensors"
    mlp = save_mlp(path, hidden)
    weights, card = load_weights(path)
    assert card["architecture"]["hidden_sizes"] == list(hidden)
    assert card["weights_sha256"] == sha256_file(path)
    assert list(weights) == list(mlp.state_dict())
    for name, tensor in mlp.state_dict().items():
        assert weights[name].dtype == np.float32 and weights[name].dtype.isnative, name
        assert np.array_equal(weights[name], tensor.numpy()), name
    # The torch loader reads through the same checks and gives the same module.
    loaded, _ = load_model(path)
    for name, tensor in mlp.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # safetensors' own reader agrees (the format is the library's, not ours).
    from safetensors.numpy import load_file
    assert all(np.array_equal(load_file(path)[k], v) for k, v in weights.items())


# ----------------------------------------------------------------------------- forward pass

@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_trained_workspace(tmp_path_factory.mktemp("weights"))


def torch_logits(mlp: MLP, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return mlp.eval()(normalize(torch.from_numpy(images))).numpy()


def test_forward_pass_gives_the_trained_models_logits(trained_ws: Workspace) -> None:
    images = np.load(trained_ws.processed_dir / "test_images.npy")
    mlp, _ = load_model(trained_ws.model_path)
    weights, _ = load_weights(trained_ws.model_path)
    expected = torch_logits(mlp, images)
    logits = mlp_logits(weights, images, batch_size=64)
    assert logits.dtype == np.float32 and logits.shape == (len(images), NUM_CLASSES)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all()
    # Batching changes nothing: each row is computed on its own.
    for batch_size in (1, 7, len(images), 10 * len(images)):
        np.testing.assert_allclose(mlp_logits(weights, images, batch_size), logits,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hidden", [(), (64, 32)], ids=str)
def test_forward_pass_of_other_depths(tmp_path: Path, hidden: tuple[int, ...]) -> None:
    images = np.random.default_rng(1).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    mlp = save_mlp(tmp_path / "model.safetensors", hidden, seed=3)
    weights, _ = load_weights(tmp_path / "model.safetensors")
    np.testing.assert_allclose(mlp_logits(weights, images, 16), torch_logits(mlp, images),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- same checks as load_model

def _broken_card(ws: Workspace, tmp_path: Path, change) -> Path:
    """A copy of the workspace's model pair with the card changed by `change(card)`."""
    model_path = tmp_path / "models" / "model.safetensors"
    model_path.parent.mkdir(parents=True)
    model_path.write_bytes(ws.model_path.read_bytes())
    card = json.loads(ws.model_card_path.read_text())
    change(card)
    model_path.with_suffix(".json").write_text(json.dumps(card))
    return model_path


@pytest.mark.parametrize("change, expected", [
    (lambda card: card["architecture"].update(hidden_sizes=[64]),
     "does not match the architecture"),
    (lambda card: card["architecture"].update(hidden_sizes=[16, 16]),
     "does not hold the tensors of the architecture"),
    (lambda card: card.update(weights_sha256="0" * 64), "is not the weights that"),
    (lambda card: card.pop("architecture"), "is not a valid model description"),
], ids=["shapes", "layers", "pair", "card"])
def test_checks_and_messages_are_load_models(trained_ws: Workspace, tmp_path: Path, change,
                                             expected: str) -> None:
    model_path = _broken_card(trained_ws, tmp_path, change)
    with pytest.raises(ModelError, match=expected) as ours:
        load_weights(model_path)
    with pytest.raises(ModelError) as torchs:
        load_model(model_path)
    assert str(ours.value) == str(torchs.value)


def test_a_missing_card_or_model_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"model description not found: .*model.json; .*"
                                         r"`dvc checkout models`.*`dvc repro train`"):
        load_weights(tmp_path / "model.safetensors")
    (tmp_path / "model.json").write_text(json.dumps({"architecture": architecture((8,))}))
    with pytest.raises(ModelError, match=r"model file not found: .*model.safetensors; .*"
                                         r"`dvc checkout models`.*`dvc repro train`"):
        load_weights(tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="is a directory"):
        load_weights(tmp_path, tmp_path / "model.json")


def test_a_bad_hidden_sizes_is_an_invalid_card(tmp_path: Path) -> None:
    save_mlp(tmp_path / "model.safetensors", (8,))
    (tmp_path / "model.json").write_text(json.dumps({"architecture": {"hidden_sizes": "8"}}))
    with pytest.raises(ModelError, match="not a valid model description.*hidden_sizes"):
        load_weights(tmp_path / "model.safetensors")


# ------------------------------------------------------------------------- crafted files

def craft(path: Path, header: dict, data: bytes, length: int | None = None,
          raw_header: bytes | None = None) -> Path:
    """A safetensors file written by hand: the length, the header, the data region."""
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def one_layer(dtype: str = "F32", weight_shape=(10, 784), weight_span=(40, 31400),
              bias_span=(0, 40)) -> dict:
    """The header of a 784-10 MLP (no hidden layer), as safetensors writes it."""
    return {"net.0.bias": {"dtype": dtype, "shape": [10], "data_offsets": list(bias_span)},
            "net.0.weight": {"dtype": dtype, "shape": list(weight_shape),
                             "data_offsets": list(weight_span)}}


@pytest.fixture
def crafted(tmp_path: Path) -> Path:
    """Where a crafted file goes, beside a card for the 784-10 MLP; the hand-made header of
    that MLP is accepted, so each test below changes one thing."""
    path = tmp_path / "model.safetensors"
    (tmp_path / "model.json").write_text(json.dumps({"architecture": architecture(())}))
    craft(path, one_layer(), bytes(31400))
    weights, _ = load_weights(path)
    assert weights["net.0.weight"].shape == (10, 784)
    return path


CRAFTED = {
    "header-length-over-cap": (dict(header=one_layer(), data=bytes(31400),
                                    length=MAX_HEADER_BYTES + 1),
                               "corrupt.*header length is .* over the"),
    "header-length-huge": (dict(header=one_layer(), data=bytes(31400), length=2 ** 63),
                           "corrupt.*header length"),
    "header-length-past-eof": (dict(header={}, data=b"", raw_header=b"{}", length=500),
                               "is truncated.*header length is 500 bytes"),
    "header-not-json": (dict(header={}, data=bytes(31400), raw_header=b"\xff{not json"),
                        "header is not JSON"),
    "header-not-object": (dict(header={}, data=bytes(31400), raw_header=b"[1, 2]"),
                          "header is not a JSON object"),
    "duplicate-names": (dict(header={}, data=bytes(31400), raw_header=(
        b'{"net.0.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}, '
        b'"net.0.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]}}')),
        "header is not JSON.*duplicate names"),
    "metadata-not-strings": (dict(header={**one_layer(), "__metadata__": {"a": 1}},
                                  data=bytes(31400)), "__metadata__ is not a map of strings"),
    "offsets-out-of-range": (dict(header=one_layer(weight_span=(40, 10 ** 12)),
                                  data=bytes(31400)), "spans .* bytes, not the"),
    "offsets-past-eof": (dict(header=one_layer(bias_span=(31360, 31400),
                                               weight_span=(0, 31360)),
                              data=bytes(31000)), "is truncated.*reach byte 31400"),
    "offsets-reversed": (dict(header=one_layer(weight_span=(31400, 40)), data=bytes(31400)),
                         "data_offsets \\[31400, 40\\]"),
    "offsets-negative": (dict(header=one_layer(bias_span=(-40, 0)), data=bytes(31400)),
                         "data_offsets"),
    "offsets-overlapping": (dict(header=one_layer(bias_span=(0, 40), weight_span=(20, 31380)),
                                 data=bytes(31400)), "overlaps another tensor's bytes"),
    "offsets-with-gap": (dict(header=one_layer(bias_span=(0, 40), weight_span=(80, 31440)),
                              data=bytes(31440)), "gap before tensor"),
    "trailing-bytes": (dict(header=one_layer(), data=bytes(31400 + 4096)),
                       "4096 bytes follow the last tensor"),
    "size-not-shape": (dict(header=one_layer(weight_span=(40, 31400 + 4)), data=bytes(31404)),
                       "spans 31364 bytes, not the 7840 x 4"),
    "wrong-dtype": (dict(header=one_layer(dtype="F64", weight_span=(80, 62800),
                                          bias_span=(0, 80)), data=bytes(62800)),
                    r"is 'F64', but the architecture in .*model.json \(hidden_sizes \[\]\) "
                    "is float32"),
    "int-dtype": (dict(header=one_layer(dtype="I32"), data=bytes(31400)), "is 'I32'"),
    "wrong-shape": (dict(header=one_layer(weight_shape=(784, 10)), data=bytes(31400)),
                    "does not match the architecture in .*model.json .*: tensor 'net.0.weight' "
                    "has shape \\(784, 10\\), not \\(10, 784\\)"),
    "bad-shape": (dict(header=one_layer(weight_shape=(10, -784)), data=bytes(31400)),
                  "has shape"),
    "missing-tensor": (dict(header={"net.0.weight": one_layer()["net.0.weight"]},
                            data=bytes(31400)), r"missing \['net.0.bias'\]"),
    "extra-tensor": (dict(header={**one_layer(), "extra": {"dtype": "F32", "shape": [0],
                                                          "data_offsets": [31400, 31400]}},
                          data=bytes(31400)), r"unexpected \['extra'\]"),
    "entry-not-a-tensor": (dict(header={**one_layer(), "net.0.bias": [0, 40]},
                                data=bytes(31400)), "no dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", CRAFTED, ids=str)
def test_a_crafted_file_is_refused_with_its_cause(crafted: Path, case: str) -> None:
    fields, expected = CRAFTED[case]
    craft(crafted, **fields)
    with pytest.raises(ModelError, match=expected) as info:
        load_weights(crafted)
    message = str(info.value)
    assert str(crafted) in message and "\n" not in message
    with pytest.raises(ModelError) as torchs:  # the torch loader gives the same verdict
        load_model(crafted)
    assert str(torchs.value) == message


@pytest.mark.parametrize("cut", [0, 4, 8, 100, 0.5, -1],
                         ids=["empty", "4-bytes", "length-only", "100-bytes", "half",
                              "last-byte"])
def test_a_truncated_file_says_it_is_truncated(tmp_path: Path, cut) -> None:
    path = tmp_path / "model.safetensors"
    save_mlp(path, (8,))
    data = path.read_bytes()
    path.write_bytes(data[:int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(ModelError, match=f"{path} is truncated .*`dvc checkout models`"):
        load_weights(path)


def test_a_header_is_checked_before_anything_is_allocated(crafted: Path) -> None:
    """A 10 KB file whose header declares a 4 GiB tensor is refused from its header alone."""
    craft(crafted, {"net.0.bias": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40]},
                    "net.0.weight": {"dtype": "F32", "shape": [1 << 30],
                                     "data_offsets": [40, 40 + (1 << 32)]}}, bytes(10_000))
    with pytest.raises(ModelError, match="has shape"):
        load_weights(crafted)


def test_a_file_larger_than_its_architecture_allows_is_not_read(crafted: Path) -> None:
    """A sparse 8 GiB file beside a card of the 784-10 MLP: refused from its size alone."""
    with open(crafted, "r+b") as fh:
        fh.truncate(8 << 30)
    with pytest.raises(ModelError, match=r"it is 8589934592 bytes, more than the \d+ that "
                                         "weights of its card's architecture can take"):
        load_weights(crafted)


# ------------------------------------------------------------------------- pickles refused

@pytest.mark.parametrize("form", ["torch-save", "bare-pickle"])
def test_a_planted_pickle_is_refused_without_running(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "model.safetensors"
    mlp = save_mlp(path, (8,))
    payload = {**mlp.state_dict(), "extra": Payload(marker)}
    if form == "torch-save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ModelError, match="is not plain weights: it is a .*would run code when "
                                         "loaded, so it was refused") as info:
        load_weights(path)
    assert ("zip archive" if form == "torch-save" else "a pickle") in str(info.value)
    with pytest.raises(ModelError):
        load_model(path)
    assert not marker.exists()


def test_an_old_model_pt_workspace_is_one_line_and_never_unpickled(
        trained_ws: Workspace, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A workspace trained by an older dltrain: models/model.pt (torch.save, carrying a
    payload here) and its card, no model.safetensors. Every command says to train again."""
    import shutil

    ws = Workspace.at(tmp_path / "old")
    shutil.copytree(trained_ws.root, ws.root)
    ws.model_path.unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"net.0.weight": torch.zeros(2), "extra": Payload(marker)},
               ws.models_dir / "model.pt")
    with pytest.raises(ModelError, match=r"model file not found: .*model.safetensors; .*"
                                         r"model.pt is the weights format of an older dltrain.*"
                                         r"`dvc repro train`"):
        load_weights(ws.model_path)
    assert main(["evaluate", "--workspace", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert "`dvc repro train`" in err and "Traceback" not in err and len(err.splitlines()) == 1
    # Named explicitly, the old file is refused as a pickle.
    assert main(["predict", "--model", str(ws.models_dir / "model.pt"),
                 str(ws.processed_dir / "test_images.npy")]) == 1
    assert "is not plain weights" in capsys.readouterr().err
    assert not marker.exists()


def test_the_digest_is_of_the_bytes_read(trained_ws: Workspace) -> None:
    _state, _card, digest = load_weights_and_digest(trained_ws.model_path)
    assert digest == sha256_file(trained_ws.model_path)


# ------------------------------------------------------------------------- no torch import

def test_evaluate_register_and_predict_do_not_import_torch() -> None:
    """What the module is for: these stages start without importing torch."""
    code = ("import sys, dltrain.evaluate.stage, dltrain.registry.register, "
            "dltrain.registry.predict, dltrain.model.weights, dltrain.cli; "
            "assert 'torch' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
