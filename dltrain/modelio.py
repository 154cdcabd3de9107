"""Saving and loading models as plain tensors: models/model.pt holds a state dict only, and
models/model.json describes it (architecture, params, lineage).

No pickles: loading uses torch.load(weights_only=True), which refuses any file that would run
code on unpickling, and the state dict is checked against the architecture in model.json.
The checks and their messages live in dltrain.weights, which reads the same files without
torch for the stages that need only the values (evaluate, register).
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

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
    write_model_pair,
)


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """The bytes of models/model.pt for these weights (torch.save of plain CPU tensors).

    Serialised in memory, then written with a plain file write (weights.write_model_pair):
    torch.save's own file writer turns a full disk into a RuntimeError without errno, which
    atomic_path could not tell from a bug. The model is small (1.6 MB for the 784-512-10 MLP).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def save_model(state_dict: dict[str, torch.Tensor], card: dict[str, Any], model_path: Path,
               card_path: Path | None = None) -> str:
    """Write the weights and their card as a pair (weights.write_model_pair); return the
    weights' sha256 (in the card too)."""
    return write_model_pair(weights_bytes(state_dict), card, model_path, card_path)


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
