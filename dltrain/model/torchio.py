"""Saving and loading models for torch users: models/model.safetensors holds the weights only,
and models/model.json describes them (architecture, params, lineage).

One reader: load_model reads the file through dltrain.model.weights (safetensors, the header checked
against the card's architecture, the card's pair), as evaluate, register and predict do
without torch, and only then builds the torch module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dltrain.model.mlp import MLP
from dltrain.model.weights import load_weights, write_model_pair


def weights_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """The bytes of models/model.safetensors for these weights (float32 CPU tensors).

    Serialised in memory, then written with a plain file write (weights.write_model_pair), so
    a full disk is an OSError that atomic_path reports. The model is small (1.6 MB for the
    784-512-10 MLP).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in state_dict.items()}
    return save(tensors)


def save_model(state_dict: dict[str, torch.Tensor], card: dict[str, Any], model_path: Path,
               card_path: Path | None = None) -> str:
    """Write the weights and their card as a pair (weights.write_model_pair); return the
    weights' sha256 (in the card too)."""
    return write_model_pair(weights_bytes(state_dict), card, model_path, card_path)


def load_model(model_path: Path, card_path: Path | None = None) -> tuple[MLP, dict[str, Any]]:
    """Rebuild the MLP described by model.json and load its checked weights."""
    state, card = load_weights(model_path, card_path)
    model = MLP(card["architecture"]["hidden_sizes"])
    # Copies: safetensors' arrays are read-only views of the file's bytes.
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
    model.eval()
    return model, card
