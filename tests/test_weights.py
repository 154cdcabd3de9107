"""dltrain.weights: the torch-free reader gives exactly torch.load's arrays, its forward pass
gives the torch MLP's logits, its checks say what load_model says, a crafted file is refused
without reading outside its bytes, and the stages that use it never import torch."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import make_trained_workspace
from test_security import Payload

from dltrain import model as torch_model
from dltrain.errors import ModelError
from dltrain.model import MLP, architecture, normalize
from dltrain.modelio import load_model, save_model
from dltrain.paths import Workspace
from dltrain.weights import (
    INPUT_SIZE,
    NUM_CLASSES,
    expected_shapes,
    load_weights,
    mlp_logits,
    read_state_dict,
)

from conftest import REPO_ROOT

HIDDEN_SIZES = [(), (32,), (512,), (64, 32)]


def save_mlp(path: Path, hidden: tuple[int, ...], seed: int = 0) -> MLP:
    """A randomly initialised MLP saved as the train stage saves it (weights + card)."""
    torch.manual_seed(seed)
    mlp = MLP(hidden)
    save_model(mlp.state_dict(), {"architecture": architecture(hidden)}, path)
    return mlp


def assert_same_as_torch(path: Path) -> None:
    ours, _sha = read_state_dict(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        expected = tensor.detach().numpy()
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        assert np.array_equal(ours[name], expected), name
        assert ours[name].flags.writeable and ours[name].dtype.isnative


# ------------------------------------------------------------------- same values as torch

def test_constants_and_shapes_are_the_torch_models() -> None:
    assert (INPUT_SIZE, NUM_CLASSES) == (torch_model.INPUT_SIZE, torch_model.NUM_CLASSES)
    for hidden in HIDDEN_SIZES:
        assert expected_shapes(hidden) == {
            k: tuple(v.shape) for k, v in MLP(hidden).state_dict().items()}


@pytest.mark.parametrize("hidden", HIDDEN_SIZES, ids=str)
def test_reader_returns_torch_loads_arrays(tmp_path: Path, hidden: tuple[int, ...]) -> None:
    path = tmp_path / "model.pt"
    save_mlp(path, hidden)
    assert_same_as_torch(path)
    weights, card = load_weights(path)
    assert card["architecture"]["hidden_sizes"] == list(hidden)
    assert {k: v.shape for k, v in weights.items()} == expected_shapes(hidden)


def test_reader_follows_offsets_strides_shared_storages_and_dtypes(tmp_path: Path) -> None:
    """What torch.save writes for views (one storage, offsets, transposed strides), parameters
    and other dtypes, not only save_model's contiguous float32 tensors."""
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = OrderedDict([
        ("slice", base[2:5, 1:4]), ("transposed", base.t()), ("row", base[3]),
        ("empty", torch.zeros(0, 3)), ("scalar", torch.tensor(2.5, dtype=torch.float64)),
        ("half", torch.linspace(-1, 1, 7).half()), ("long", torch.arange(-3, 4)),
        ("int8", torch.tensor([-128, 0, 127], dtype=torch.int8)),
        ("bytes", torch.tensor([0, 255], dtype=torch.uint8)),
        ("bool", torch.tensor([True, False])),
        ("param", torch.nn.Parameter(torch.ones(2, 2))),
    ])
    path = tmp_path / "views.pt"
    torch.save(state, path)
    assert_same_as_torch(path)
    # A module's own state_dict() (an OrderedDict with _metadata), saved directly.
    torch.save(MLP((8,)).state_dict(), path)
    assert_same_as_torch(path)


def big_endian_copy(source: Path, target: Path) -> None:
    """The zip that torch.save writes on a big-endian machine: byteorder 'big' and every
    storage's bytes swapped (all of a saved MLP's tensors are float32)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, dtype="<f4").astype(">f4").tobytes()
            dst.writestr(info.filename, data)


def test_big_endian_files_read_as_torch_reads_them(tmp_path: Path) -> None:
    save_mlp(tmp_path / "little.pt", (16,))
    big_endian_copy(tmp_path / "little.pt", tmp_path / "big.pt")
    assert (tmp_path / "big.pt").read_bytes() != (tmp_path / "little.pt").read_bytes()
    assert_same_as_torch(tmp_path / "big.pt")
    little, _ = read_state_dict(tmp_path / "little.pt")
    big, _ = read_state_dict(tmp_path / "big.pt")
    assert all(np.array_equal(little[k], big[k]) for k in little)


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
    mlp = save_mlp(tmp_path / "model.pt", hidden, seed=3)
    weights, _ = load_weights(tmp_path / "model.pt")
    np.testing.assert_allclose(mlp_logits(weights, images, 16), torch_logits(mlp, images),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------- same checks as load_model

def _broken_card(ws: Workspace, tmp_path: Path, change) -> Path:
    """A copy of the workspace's model pair with the card changed by `change(card)`."""
    model_path = tmp_path / "models" / "model.pt"
    model_path.parent.mkdir(parents=True)
    model_path.write_bytes(ws.model_path.read_bytes())
    card = json.loads(ws.model_card_path.read_text())
    change(card)
    model_path.with_suffix(".json").write_text(json.dumps(card))
    return model_path


@pytest.mark.parametrize("change, expected", [
    (lambda card: card["architecture"].update(hidden_sizes=[64]),
     "does not match the architecture"),
    (lambda card: card.update(weights_sha256="0" * 64), "is not the weights that"),
    (lambda card: card.pop("architecture"), "is not a valid model description"),
], ids=["shapes", "pair", "card"])
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
        load_weights(tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({"architecture": architecture((8,))}))
    with pytest.raises(ModelError, match="model file not found: .*run `dltrain train` first"):
        load_weights(tmp_path / "model.pt")


def test_a_bad_hidden_sizes_is_an_invalid_card(tmp_path: Path) -> None:
    save_mlp(tmp_path / "model.pt", (8,))
    (tmp_path / "model.json").write_text(json.dumps({"architecture": {"hidden_sizes": "8"}}))
    with pytest.raises(ModelError, match="not a valid model description.*hidden_sizes"):
        load_weights(tmp_path / "model.pt")


# ------------------------------------------------------------------------- crafted files

class FakeStorage:
    """Pickled as torch.save pickles a storage: a persistent id naming a data/<key> member."""

    def __init__(self, key: str, numel: int, storage_type: type = torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class FakeTensor:
    """Pickled as torch.save pickles a tensor: a call of _rebuild_tensor_v2 on a storage,
    with whatever offset, size and stride the test asks for."""

    def __init__(self, storage: FakeStorage, offset: int, size: tuple, stride: tuple,
                 state: dict | None = None) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())
        self.state = state

    def __reduce__(self):
        if self.state is not None:  # adds a BUILD opcode: set the rebuilt object's state
            return (torch._utils._rebuild_tensor_v2, self.args, self.state)
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def write_archive(path: Path, state: object, blobs: dict[str, bytes]) -> Path:
    """A file laid out as torch.save lays it out, holding `state` pickled as is."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for key, data in blobs.items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", "3\n")
    return path


FOUR = np.arange(4, dtype="<f4").tobytes()  # a storage of 4 floats: 0, 1, 2, 3


def test_the_crafting_helper_writes_torchs_format(tmp_path: Path) -> None:
    """The oracle for the refusals below: a well-formed crafted file reads in torch too."""
    storage = FakeStorage("0", 4)
    path = write_archive(tmp_path / "ok.pt", {"w": FakeTensor(storage, 1, (2, 1), (2, 1)),
                                              "v": FakeTensor(storage, 0, (4,), (1,))},
                         {"0": FOUR})
    assert_same_as_torch(path)
    assert read_state_dict(path)[0]["w"].tolist() == [[1.0], [3.0]]


@pytest.mark.parametrize("offset, size, stride, blob, numel", [
    (3, (2,), (1,), FOUR, 4),            # the offset runs past the end
    (0, (2, 2), (1, 10**6), FOUR, 4),    # a stride jumps far outside
    (0, (2,), (2**62,), FOUR, 4),        # a stride that would overflow a byte offset
    (-1, (2,), (1,), FOUR, 4),           # a negative offset
    (0, (2,), (-1,), FOUR, 4),           # a negative stride
    (0, (10**9,), (0,), FOUR, 4),        # stride 0: a 4-float file as a billion floats
    (0, (4,), (1,), FOUR, 5),            # numel says 5 floats, the member holds 4
    (0, (4,), (1,), FOUR[:12], 4),       # the member is short
    (0, (2.0,), (1,), FOUR, 4),          # a float size
], ids=["offset", "stride", "overflow", "negative-offset", "negative-stride", "stride-0",
        "numel", "short-member", "float-size"])
def test_out_of_bounds_or_inconsistent_tensors_are_refused(tmp_path: Path, offset, size,
                                                           stride, blob, numel) -> None:
    path = write_archive(tmp_path / "bad.pt",
                         {"w": FakeTensor(FakeStorage("0", numel), offset, size, stride)},
                         {"0": blob})
    with pytest.raises(ModelError, match="corrupt or not a PyTorch weights file") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_the_pickle_cannot_set_the_readers_objects_state(tmp_path: Path) -> None:
    """A BUILD opcode on a rebuilt tensor (say, to swap its array) is refused."""
    tensor = FakeTensor(FakeStorage("0", 4), 0, (4,), (1,), state={"array": "x"})
    path = write_archive(tmp_path / "build.pt", {"w": tensor}, {"0": FOUR})
    with pytest.raises(ModelError, match="corrupt.*sets the state"):
        read_state_dict(path)


def test_a_missing_storage_member_is_refused(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "bad.pt",
                         {"w": FakeTensor(FakeStorage("7", 4), 0, (4,), (1,))}, {})
    with pytest.raises(ModelError, match="storage '7' is missing"):
        read_state_dict(path)


def test_a_pickle_payload_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    mlp = save_mlp(tmp_path / "model.pt", (8,))
    torch.save({**mlp.state_dict(), "extra": Payload(marker)}, tmp_path / "model.pt")
    with pytest.raises(ModelError, match="not plain weights") as info:
        load_weights(tmp_path / "model.pt")
    assert "would run code when loaded" in str(info.value)
    assert "Unsupported global: GLOBAL io.open" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("obj", [{"w": np.zeros(3)}, {"w": torch.zeros(2).to_sparse()}],
                         ids=["numpy", "sparse"])
def test_objects_other_than_dense_tensors_are_refused(tmp_path: Path, obj) -> None:
    torch.save(obj, tmp_path / "model.pt")
    with pytest.raises(ModelError, match="not plain weights.*Unsupported global"):
        read_state_dict(tmp_path / "model.pt")


@pytest.mark.parametrize("obj", [[torch.zeros(2)], {"w": 1.0}, {1: torch.zeros(2)}],
                         ids=["list", "number", "int-key"])
def test_containers_other_than_a_state_dict_are_refused(tmp_path: Path, obj) -> None:
    torch.save(obj, tmp_path / "model.pt")
    with pytest.raises(ModelError, match="is not a state dict of tensors"):
        read_state_dict(tmp_path / "model.pt")


@pytest.mark.parametrize("cut", [100, 0.5, -1], ids=["100-bytes", "half", "last-byte"])
def test_truncated_or_foreign_files_are_corrupt(tmp_path: Path, cut) -> None:
    path = tmp_path / "model.pt"
    save_mlp(path, (8,))
    data = path.read_bytes()
    path.write_bytes(data[:int(cut * len(data)) if isinstance(cut, float) else cut])
    with pytest.raises(ModelError, match="corrupt or not a PyTorch weights file"):
        read_state_dict(path)
    path.write_text("not a zip at all")
    with pytest.raises(ModelError, match="corrupt or not a PyTorch weights file"):
        read_state_dict(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/other.txt", "a zip, but not torch.save's")
    with pytest.raises(ModelError, match="no archive/data.pkl"):
        read_state_dict(path)


# ------------------------------------------------------------------------- no torch import

def test_evaluate_and_register_do_not_import_torch() -> None:
    """What the module is for: these two stages start without torch's 1.5-2 s import."""
    code = ("import sys, dltrain.evaluate, dltrain.register, dltrain.weights, dltrain.cli; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules "
            "if m.startswith('torch'))[:5]")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
