"""Saving and loading models as plain tensors: models/model.pt holds a state dict only, and
models/model.json describes it (architecture, params, lineage).

No pickles: loading uses torch.load(weights_only=True), which refuses any file that would run
code on unpickling, and the state dict is checked against the architecture in model.json.
The checks and their messages live in dltrain.weights, which reads the same files without
torch for the stages that need only the values (evaluate, register).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from dltrain.io import atomic_path
from dltrain.model import MLP
from dltrain.weights import (
    card_path_for,
    check_pair,
    check_shapes,
    corrupt_error,
    not_a_state_dict_error,
    not_found_error,
    read_card,
    refused_error,
    sha256_file,
)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_model(state_dict: dict[str, torch.Tensor], card: dict[str, Any], model_path: Path,
               card_path: Path | None = None) -> str:
    """Write the weights and their card as a pair; return the weights' sha256 (in the card too).

    DVC tracks model.pt and model.json as two outputs, so the pair cannot be one rename. Both
    are written in full and synced beside their final names first, then renamed: a failure
    while writing (a full disk) leaves the previous pair untouched. The only window left, a
    crash between the two renames, leaves a card whose weights_sha256 is not the weights',
    which load_model refuses.
    """
    model_path = Path(model_path)
    card_path = Path(card_path) if card_path else card_path_for(model_path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    # Serialised in memory, then written with a plain file write: torch.save's own file writer
    # turns a full disk into a RuntimeError without errno, which atomic_path could not tell
    # from a bug. The model is small (1.6 MB for the 784-512-10 MLP).
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    weights = buffer.getvalue()
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


def load_state_dict(model_path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict of plain tensors; anything else is refused with ModelError."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise not_found_error(model_path)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text is a page of advice on how to load it anyway; keep only what it found.
        found = re.search(r"Unsupported [^\n]*?(?=\. |\n|$)", str(exc))
        raise refused_error(model_path, found.group(0) if found else None) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise corrupt_error(model_path, exc) from exc
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise not_a_state_dict_error(model_path)
    return state


def load_model(model_path: Path, card_path: Path | None = None) -> tuple[MLP, dict[str, Any]]:
    """Rebuild the MLP described by model.json and load its weights, checking every shape."""
    model_path = Path(model_path)
    card_path = Path(card_path) if card_path else card_path_for(model_path)
    card, hidden_sizes = read_card(card_path)
    state = load_state_dict(model_path)
    check_pair(model_path, card_path, card, sha256_file(model_path))
    check_shapes(model_path, card_path, hidden_sizes,
                 {k: tuple(v.shape) for k, v in state.items()})
    model = MLP(hidden_sizes)
    model.load_state_dict(state)
    model.eval()
    return model, card
