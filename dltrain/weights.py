"""models/model.pt without torch: read the weights, check them against models/model.json, run
the MLP's forward pass with numpy only, and write a model.pt/model.json pair from the bytes
that dltrain.modelio.weights_bytes made (the train stage's driver installs what its rank-0
worker serialised).

Why: `import torch` takes 1.4-2 s on a 2-core machine, half of the evaluate stage and most of
the register stage's start, which need nothing of torch but the weights' values.
dltrain.modelio (torch.load(weights_only=True)) stays the loader for torch users (predict,
training, tests); both share the card checks below and their error messages.

model.pt is torch.save's zip format holding a dict {name: CPU tensor}:
    <prefix>/data.pkl     the pickled dict; each tensor is a call of
                          torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                          whose storage is a persistent id ('storage', FloatStorage, key,
                          location, numel)
    <prefix>/data/<key>   each storage's raw bytes
    <prefix>/byteorder    'little' or 'big' (absent: little, as torch assumes)
The pickle is read by an Unpickler that resolves only the globals a state dict needs, mapped to
functions of this module: any other global (a pickle payload) is refused before it is called.
Offsets, sizes and strides are bounds-checked against their storage before any array view,
so a crafted file cannot make the reader touch memory outside the file's bytes.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.errors import ModelError
from dltrain.io import atomic_path, read_json

# The MLP's input and output sizes (dltrain.model imports them from here: no torch here).
INPUT_SIZE = 28 * 28
NUM_CLASSES = 10

# torch's storage classes, as torch.save names them ("torch FloatStorage"), and their numpy
# types. BFloat16Storage has no numpy type: it is refused as unreadable here.
_STORAGE_DTYPES = {"FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2",
                   "LongStorage": "i8", "IntStorage": "i4", "ShortStorage": "i2",
                   "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "b1"}


# ------------------------------------------------------------------------------- messages

def refused_error(model_path: Path, found: str | None) -> ModelError:
    """The file's pickle names a global outside the allow-list (torch's reader or ours)."""
    return ModelError(f"{model_path} is not plain weights: it holds objects that would run "
                      "code when loaded, so it was refused" + (f" ({found})" if found else ""))


def corrupt_error(model_path: Path, exc: BaseException) -> ModelError:
    return ModelError(f"{model_path} is corrupt or not a PyTorch weights file: {exc}")


def not_found_error(model_path: Path) -> ModelError:
    return ModelError(f"model file not found: {model_path} (run `dltrain train` first)")


def not_a_state_dict_error(model_path: Path) -> ModelError:
    return ModelError(f"{model_path} is not a state dict of tensors")


# --------------------------------------------------------------------------- the unpickler

class Refused(pickle.UnpicklingError):
    """A global outside the allow-list: loading it could run code."""


class Malformed(ValueError):
    """A zip and a pickle, but not a well-formed state dict (bad storage, out-of-bounds view)."""


class _Sealed:
    """Base of the reader's own objects: the pickle's BUILD opcode cannot set their state."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise Malformed(f"the pickle sets the state of a {type(self).__name__}")


class _StorageType(_Sealed):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype) -> None:
        self.name, self.dtype = name, dtype


class _Storage(_Sealed):
    """One storage's elements (1-D, in the file's byte order, read-only)."""

    __slots__ = ("kind", "array")

    def __init__(self, kind: _StorageType, array: np.ndarray) -> None:
        self.kind, self.array = kind, array


class _Tensor(_Sealed):
    """A rebuilt tensor: a fresh array in native byte order."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


_STORAGE_TYPES = {name: _StorageType(name, np.dtype(code))
                  for name, code in _STORAGE_DTYPES.items()}


def _is_index(value: Any) -> bool:
    return type(value) is int and value >= 0  # not bool, not a float


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                    backward_hooks: Any, metadata: Any = None) -> _Tensor:
    """torch._utils._rebuild_tensor_v2, checked: the view stays inside its storage."""
    if not isinstance(storage, _Storage):
        raise Malformed("a tensor whose storage is not a storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and _is_index(offset) and all(_is_index(v) for v in (*size, *stride))):
        raise Malformed(f"a tensor with an invalid offset/size/stride: {offset!r:.40} "
                        f"{size!r:.80} {stride!r:.80}")
    if backward_hooks or metadata:  # torch writes an empty OrderedDict and no metadata
        raise Malformed("a tensor with backward hooks or metadata (not plain weights)")
    base = storage.array
    native = base.dtype.newbyteorder("=")
    count = math.prod(size)
    if count == 0:
        return _Tensor(np.zeros(size, dtype=native))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= base.size:
        raise Malformed(f"a tensor of size {size} (offset {offset}, stride {stride}) reaches "
                        f"element {last} of a storage of {base.size}")
    if count > base.size:
        # Overlapping (zero) strides could turn a small file into a huge array.
        raise Malformed(f"a tensor of size {size} has more elements than its storage "
                        f"({base.size})")
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=size, strides=tuple(s * base.itemsize for s in stride),
        writeable=False)
    return _Tensor(np.array(view, dtype=native, copy=True))


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _Tensor:
    """torch._utils._rebuild_parameter: an nn.Parameter saved as such is its tensor."""
    if not isinstance(data, _Tensor) or backward_hooks:
        raise Malformed("a parameter that is not a plain tensor")
    return data


_ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("collections", "OrderedDict"): OrderedDict}


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str,
                 byteorder: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._order = "<" if byteorder == "little" else ">"
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        found = _ALLOWED.get((module, name))
        if found is None:
            raise Refused(f"Unsupported global: GLOBAL {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Malformed(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, location, numel = pid
        if not (isinstance(kind, _StorageType) and isinstance(key, str)
                and isinstance(location, str) and _is_index(numel)):
            raise Malformed(f"invalid storage reference {pid!r:.80}")
        if key in self._storages:
            storage = self._storages[key]
            if storage.kind is not kind or storage.array.size != numel:
                raise Malformed(f"storage {key!r} is referenced with two types or sizes")
            return storage
        member = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise Malformed(f"storage {key!r} is missing from the archive") from None
        nbytes = numel * kind.dtype.itemsize
        if info.file_size != nbytes:
            raise Malformed(f"storage {key!r} holds {info.file_size} bytes, not the "
                            f"{numel} x {kind.dtype.itemsize} its tensors say")
        array = np.frombuffer(self._archive.read(info),
                              dtype=kind.dtype.newbyteorder(self._order))
        storage = self._storages[key] = _Storage(kind, array)
        return storage


# What a damaged or hostile file can make zipfile and the unpickler raise.
_PARSE_ERRORS = (zipfile.BadZipFile, zlib.error, pickle.UnpicklingError, EOFError, ValueError,
                 TypeError, KeyError, IndexError, AttributeError, OverflowError,
                 NotImplementedError, RecursionError, struct.error, UnicodeDecodeError)


def _unpickle(data: bytes) -> Any:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        if not names:
            raise Malformed("an empty archive")
        # torch's reader takes the archive's top folder from its first record, too.
        prefix = names[0].split("/", 1)[0]
        try:
            pickled = archive.read(f"{prefix}/data.pkl")
        except KeyError:
            raise Malformed(f"no {prefix}/data.pkl in the archive (not torch.save's format)") \
                from None
        byteorder = (archive.read(f"{prefix}/byteorder").decode()
                     if f"{prefix}/byteorder" in names else "little")
        if byteorder not in ("little", "big"):
            raise Malformed(f"unknown byte order {byteorder!r:.20}")
        return _WeightsUnpickler(pickled, archive, prefix, byteorder).load()


def parse_state_dict(data: bytes, model_path: Path) -> dict[str, np.ndarray]:
    """The state dict in torch.save's bytes `data` (named `model_path` in errors) as numpy
    arrays, with the names, shapes, dtypes and values that torch.load gives."""
    try:
        state = _unpickle(data)
    except Refused as exc:
        raise refused_error(model_path, str(exc)) from exc
    except _PARSE_ERRORS as exc:
        raise corrupt_error(model_path, exc) from exc
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, _Tensor) for k, v in state.items()):
        raise not_a_state_dict_error(model_path)
    return {k: v.array for k, v in state.items()}


def read_state_dict(model_path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The state dict in `model_path` and the sha256 of the very bytes it was read from."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise not_found_error(model_path)
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise corrupt_error(model_path, exc) from exc
    return parse_state_dict(data, model_path), hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------- card and shape checks

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path_for(model_path: Path) -> Path:
    """models/model.pt -> models/model.json."""
    return Path(model_path).with_suffix(".json")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_model_pair(weights: bytes, card: dict[str, Any], model_path: Path,
                     card_path: Path | None = None) -> str:
    """Write model.pt (`weights`, torch.save's bytes: dltrain.modelio.weights_bytes) and its
    card as a pair; return the weights' sha256 (in the card too). No torch: the train stage's
    driver installs the bytes its rank-0 worker wrote.

    DVC tracks model.pt and model.json as two outputs, so the pair cannot be one rename. Both
    are written in full and synced beside their final names first, then renamed: a failure
    while writing (a full disk) leaves the previous pair untouched. The only window left, a
    crash between the two renames, leaves a card whose weights_sha256 is not the weights',
    which load_model and load_weights refuse.
    """
    model_path = Path(model_path)
    card_path = Path(card_path) if card_path else card_path_for(model_path)
    weights_sha256 = hashlib.sha256(weights).hexdigest()
    # write_json's format: indented, sorted keys, stable bytes for DVC.
    card_bytes = (json.dumps({**card, "weights_sha256": weights_sha256}, indent=2,
                             sort_keys=True) + "\n").encode()
    # Nested: both files are complete before the first rename (the card's, as the inner block
    # exits; the weights' last). A full disk names model_path (the outer block).
    with atomic_path(model_path) as weights_tmp:
        _write_synced(weights_tmp, weights)
        with atomic_path(card_path) as card_tmp:
            _write_synced(card_tmp, card_bytes)
    return weights_sha256


def read_card(card_path: Path) -> tuple[dict[str, Any], list[int]]:
    """models/model.json and the hidden layer widths its architecture records."""
    try:
        card = read_json(card_path)
        hidden_sizes = card["architecture"]["hidden_sizes"]
    except FileNotFoundError as exc:
        raise ModelError(f"model description not found: {card_path}; restore the model from "
                         "DVC's cache (`dvc checkout models`) or train it again "
                         "(`dvc repro train`)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{card_path} is not a valid model description: {exc}") from exc
    if not (isinstance(hidden_sizes, list)
            and all(type(h) is int and h >= 1 for h in hidden_sizes)):
        raise ModelError(f"{card_path} is not a valid model description: "
                         f"architecture.hidden_sizes is {hidden_sizes!r:.80}, not a list of "
                         "positive layer widths")
    return card, hidden_sizes


def check_pair(model_path: Path, card_path: Path, card: dict[str, Any],
               weights_sha256: str) -> None:
    """The card was written with these weights (save_model records their sha256 in it)."""
    recorded = card.get("weights_sha256")  # absent from cards older than the pair check
    if recorded is not None and weights_sha256 != recorded:
        raise ModelError(f"{model_path} is not the weights that {card_path} describes (their "
                         "sha256 differs from the card's weights_sha256: a save was "
                         "interrupted between the two files, or one was replaced); re-run "
                         "`dltrain train` (or `dvc repro train`)")


def architecture(hidden_sizes: Sequence[int]) -> dict:
    """What models/model.json records so that a loader can rebuild the module."""
    return {"type": "mlp", "input_size": INPUT_SIZE, "hidden_sizes": list(hidden_sizes),
            "num_classes": NUM_CLASSES, "activation": "relu", "output": "logits"}


def expected_shapes(hidden_sizes: Sequence[int], input_size: int = INPUT_SIZE,
                    num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of dltrain.model.MLP(hidden_sizes): its nn.Sequential `net`
    holds Linear, ReLU, Linear, ..., so the Linear layers are net.0, net.2, net.4, ..."""
    widths = [input_size, *hidden_sizes, num_classes]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        shapes[f"net.{2 * layer}.weight"] = (fan_out, fan_in)
        shapes[f"net.{2 * layer}.bias"] = (fan_out,)
    return shapes


def check_shapes(model_path: Path, card_path: Path, hidden_sizes: Sequence[int],
                 actual: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the card's architecture needs is there with its shape, and nothing else."""
    expected = expected_shapes(hidden_sizes)
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()))
        raise ModelError(f"{model_path} does not match the architecture in {card_path} "
                         f"(hidden_sizes {hidden_sizes}): differing tensors {diff[:4]}")


def load_weights(model_path: Path, card_path: Path | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The torch-free twin of dltrain.modelio.load_model: the weights as numpy arrays and the
    card, with the same checks (plain weights only, the card's pair, every shape)."""
    state, card, _weights_sha256 = load_weights_and_digest(model_path, card_path)
    return state, card


def load_weights_and_digest(model_path: Path, card_path: Path | None = None
                            ) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """load_weights, plus the sha256 of the very bytes that were read and checked."""
    model_path = Path(model_path)
    card_path = Path(card_path) if card_path else card_path_for(model_path)
    card, hidden_sizes = read_card(card_path)
    state, weights_sha256 = read_state_dict(model_path)
    check_pair(model_path, card_path, card, weights_sha256)
    check_shapes(model_path, card_path, hidden_sizes,
                 {k: tuple(v.shape) for k, v in state.items()})
    return state, card, weights_sha256


# ---------------------------------------------------------------------------- forward pass

def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 [0, 1], flattened to (N, 784): dltrain.model.normalize's values."""
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)


def mlp_logits(state: dict[str, np.ndarray], images: np.ndarray,
               batch_size: int) -> np.ndarray:
    """Logits (N, 10) float32 of uint8 images (N, 28, 28) through the MLP whose checked state
    dict is `state` (Linear, ReLU, ..., Linear), in batches to bound memory."""
    layers = [(state[f"net.{2 * k}.weight"].astype(np.float32, copy=False).T,
               state[f"net.{2 * k}.bias"].astype(np.float32, copy=False))
              for k in range(len(state) // 2)]
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size])
        for depth, (weight_t, bias) in enumerate(layers):
            x = x @ weight_t
            x += bias
            if depth < len(layers) - 1:
                np.maximum(x, 0, out=x)
        chunks.append(x)
    return np.concatenate(chunks) if chunks else np.zeros((0, NUM_CLASSES), np.float32)
