"""models/model.safetensors without torch: read the weights, check them against
models/model.json, run the MLP's forward pass with numpy only, and write a
model.safetensors/model.json pair from the bytes that dltrain.model.torchio.weights_bytes made (the
train stage's driver installs what its rank-0 worker serialised).

Why: importing torch is most of a stage's start-up (BENCHMARKS.md, "Figures behind choices in
the code"), and the evaluate and register stages and predict need nothing of torch but the
weights' values; tests/test_weights.py::test_evaluate_register_and_predict_do_not_import_torch
holds them to it.
dltrain.model.torchio (for torch users: predict's callers in tests, training) reads through this
module too, so every reader of a model file gives the same verdict.

The format is safetensors (https://huggingface.co/docs/safetensors): no pickle, so loading
cannot run code. The file is
    8 bytes       N, the header's length (little-endian u64)
    N bytes       a JSON object {name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}
                  (and an optional "__metadata__" of strings), padded with spaces
    the rest      the data region: each tensor's bytes at [begin, end) of it
safetensors' own reader checks most of this too, but a crafted file is checked here first,
against the card's architecture, so that every fault gets one line naming the file and what is
wrong with it (a truncated file says so), and a header cannot make the reader allocate more
than the file holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.atomic import atomic_path, read_json
from dltrain.errors import ModelError
from dltrain.model.architecture import INPUT_SIZE, NUM_CLASSES, expected_shapes
from dltrain.paths import card_path_for

# Every tensor of the MLP is float32, and the card's architecture has no other dtype.
WEIGHTS_DTYPE = "F32"
_ITEMSIZE = {"F32": 4}
# A header for the deepest MLP params.yaml allows is a few KiB; safetensors' own cap is 100 MB.
MAX_HEADER_BYTES = 1 << 20
# The first bytes of the formats a model file must not be: torch.save's zip (model.pt) and
# a bare pickle (protocol 2 and later start with the PROTO opcode 0x80 and the protocol). As a
# header length, either is far over MAX_HEADER_BYTES, so no safetensors file starts so.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)


# ------------------------------------------------------------------------------- messages

def refused_error(model_path: Path, what: str) -> ModelError:
    """A pickle-bearing file (torch.save's model.pt, a bare pickle): never loaded."""
    return ModelError(f"{model_path} is not plain weights: it is {what}, a format that can "
                      "hold objects that would run code when loaded, so it was refused; "
                      "dltrain reads only safetensors (models/model.safetensors, as "
                      "`dltrain train` writes it)")


def corrupt_error(model_path: Path, why: str) -> ModelError:
    return ModelError(f"{model_path} is corrupt or not a safetensors weights file: {why}")


def truncated_error(model_path: Path, why: str) -> ModelError:
    return ModelError(f"{model_path} is truncated ({why}); restore it (`dvc checkout models`) "
                      "or train it again (`dvc repro train`)")


def not_found_error(model_path: Path) -> ModelError:
    model_path = Path(model_path)
    old = model_path.with_name("model.pt")
    if model_path.suffix == ".safetensors" and old.is_file():
        # A workspace trained by an older dltrain: its weights are a pickle, never loaded.
        return ModelError(f"model file not found: {model_path}; {old} is the weights format "
                          "of an older dltrain (a pickle, which is no longer read): train the "
                          "model again with `dvc repro train` (or `dltrain train`)")
    return ModelError(f"model file not found: {model_path}; restore it from DVC's cache "
                      "(`dvc checkout models`) or train it (`dvc repro train`)")


# ------------------------------------------------------------------------- the file format

def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate names {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    return dict(pairs)


def _header(data: bytes, model_path: Path) -> tuple[dict[str, Any], int]:
    """The header's tensor entries (without __metadata__) and where the data region starts."""
    if data[:4] == _ZIP_MAGIC:
        raise refused_error(model_path, "a zip archive (torch.save's model.pt format, a "
                                        "pickle inside)")
    if len(data) < 8:
        raise truncated_error(model_path, f"{len(data)} bytes, less than the 8-byte header "
                                          "length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        if data[0] == 0x80 and data[1] in _PICKLE_PROTOCOLS:
            raise refused_error(model_path, "a pickle")
        raise corrupt_error(model_path, f"its header length is {length} bytes, over the "
                                        f"{MAX_HEADER_BYTES} a weights file needs")
    if 8 + length > len(data):
        raise truncated_error(model_path, f"its header length is {length} bytes, but the file "
                                          f"has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"),
                            object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise corrupt_error(model_path, f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt_error(model_path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise corrupt_error(model_path, "its __metadata__ is not a map of strings")
    return header, 8 + length


def _check_entries(entries: dict[str, Any], data_len: int, model_path: Path,
                   expected: dict[str, tuple[int, ...]], card_path: Path | str) -> None:
    """Every tensor the architecture needs, float32, of its shape, inside the data region,
    the regions back to back with nothing overlapping and nothing left over."""
    names = set(entries)
    if names != set(expected):
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        raise ModelError(f"{model_path} does not hold the tensors of the architecture in "
                         f"{card_path}: missing {missing[:4]}, unexpected {extra[:4]}")
    spans = []
    for name, entry in entries.items():
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise corrupt_error(model_path, f"tensor {name!r} has no dtype, shape and "
                                            "data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype != WEIGHTS_DTYPE:
            raise ModelError(f"{model_path}: tensor {name!r} is {dtype!r:.20}, but the "
                             f"architecture in {card_path} is float32 ({WEIGHTS_DTYPE})")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise corrupt_error(model_path, f"tensor {name!r} has shape {shape!r:.60}")
        if tuple(shape) != expected[name]:
            raise ModelError(f"{model_path} does not match the architecture in {card_path}: "
                             f"tensor {name!r} has shape {tuple(shape)}, not "
                             f"{expected[name]}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(n) is int and n >= 0 for n in offsets)
                and offsets[0] <= offsets[1]):
            raise corrupt_error(model_path, f"tensor {name!r} has data_offsets "
                                            f"{offsets!r:.60}")
        begin, end = offsets
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise corrupt_error(model_path, f"tensor {name!r} spans {end - begin} bytes, not "
                                            f"the {math.prod(shape)} x {_ITEMSIZE[dtype]} "
                                            "of its shape")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin < position:
            raise corrupt_error(model_path, f"tensor {name!r} overlaps another tensor's bytes "
                                            f"(at {begin})")
        if begin > position:
            raise corrupt_error(model_path, f"the data region has a gap before tensor "
                                            f"{name!r} (bytes {position} to {begin})")
        position = end
    if position > data_len:
        raise truncated_error(model_path, f"its tensors' data_offsets reach byte {position} of "
                                          f"the data, the file holds {data_len}")
    if position < data_len:
        raise corrupt_error(model_path, f"{data_len - position} bytes follow the last tensor")


def parse_state_dict(data: bytes, model_path: Path,
                     expected: dict[str, tuple[int, ...]],
                     card_path: Path | str = "the card") -> dict[str, np.ndarray]:
    """The weights in safetensors bytes `data` (named `model_path` in errors) as float32 numpy
    arrays, after checking the header against `expected` ({name: shape}, expected_shapes of
    the card's architecture): a file is read by safetensors only once it is known to be what
    the card describes."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    entries, data_start = _header(data, model_path)
    _check_entries(entries, len(data) - data_start, model_path, expected, card_path)
    try:
        arrays = load(data)
    except (SafetensorError, ValueError, KeyError) as exc:  # checked above: not expected
        raise corrupt_error(model_path, str(exc)) from exc
    return {name: arrays[name] for name in expected}


def max_file_size(expected: dict[str, tuple[int, ...]]) -> int:
    """The largest a well-formed file of these tensors can be: the length, the largest header
    allowed, the tensors' bytes."""
    return 8 + MAX_HEADER_BYTES + sum(math.prod(shape) * _ITEMSIZE[WEIGHTS_DTYPE]
                                      for shape in expected.values())


def read_model_bytes(model_path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a model file, with the errors a user can act on; a file over `max_bytes`
    is refused before it is read (a huge file cannot fill memory)."""
    model_path = Path(model_path)
    if model_path.is_dir():
        raise ModelError(f"{model_path} is a directory, not a model file")
    if not model_path.is_file():
        raise not_found_error(model_path)
    try:
        size = model_path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise corrupt_error(model_path, f"it is {size} bytes, more than the {max_bytes} "
                                            "that weights of its card's architecture can take")
        return model_path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {model_path}: {exc.strerror or exc}") from exc


# ------------------------------------------------------------------- card and shape checks

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_model_pair(weights: bytes, card: dict[str, Any], model_path: Path,
                     card_path: Path | None = None) -> str:
    """Write model.safetensors (`weights`, safetensors bytes: dltrain.model.torchio.weights_bytes)
    and its card as a pair; return the weights' sha256 (in the card too). No torch: the train
    stage's driver installs the bytes its rank-0 worker wrote.

    DVC tracks model.safetensors and model.json as two outputs, so the pair cannot be one
    rename. Both are written in full and synced beside their final names first, then renamed:
    a failure while writing (a full disk) leaves the previous pair untouched. The only window
    left, a crash between the two renames, leaves a card whose weights_sha256 is not the
    weights', which load_model and load_weights refuse.
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


def load_weights(model_path: Path, card_path: Path | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The weights as float32 numpy arrays and the card, checked: a well-formed safetensors
    file, every tensor of the card's architecture with its shape, the card's pair."""
    state, card, _weights_sha256 = load_weights_and_digest(model_path, card_path)
    return state, card


def load_weights_and_digest(model_path: Path, card_path: Path | None = None
                            ) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """load_weights, plus the sha256 of the very bytes that were read and checked."""
    model_path = Path(model_path)
    card_path = Path(card_path) if card_path else card_path_for(model_path)
    card, hidden_sizes = read_card(card_path)
    expected = expected_shapes(hidden_sizes)
    data = read_model_bytes(model_path, max_file_size(expected))
    state = parse_state_dict(data, model_path, expected,
                             f"{card_path} (hidden_sizes {hidden_sizes})")
    weights_sha256 = hashlib.sha256(data).hexdigest()
    check_pair(model_path, card_path, card, weights_sha256)
    return state, card, weights_sha256


# ---------------------------------------------------------------------------- forward pass

def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 [0, 1], flattened to (N, 784): dltrain.model.mlp.normalize's
    values."""
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


def probabilities(state: dict[str, np.ndarray], images: np.ndarray,
                  batch_size: int = 1000) -> np.ndarray:
    """Softmax class probabilities (N, 10) float32 of uint8 images (N, 28, 28) or (N, 784):
    the one computation behind `dltrain predict` and the MLflow model, so both give the same
    classes."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 2 or (
            int(np.prod(images.shape[1:])) != INPUT_SIZE):
        raise ValueError(f"expected uint8 images of shape (N, 28, 28) or (N, 784), got "
                         f"{images.dtype} {images.shape}")
    logits = mlp_logits(state, images, batch_size)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits
