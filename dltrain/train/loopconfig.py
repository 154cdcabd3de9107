"""What the train stage's driver and its workers share, without torch: the loop's config, the
files of a checkpoint, and which epoch's model the stage ships.

The train stage's driver (dltrain.train) reads checkpoints without torch: it hands LoopConfig to
the workers, and installs the model.safetensors bytes that rank 0 wrote into the final
checkpoint (dltrain.model.weights.write_model_pair).

A checkpoint is written by dltrain.train.loop.save_state and read back by
dltrain.train.loop.load_state only: the tensors in safetensors (no pickle), the optimizer's
state in torch's format (read with torch.load(weights_only=True)), the epochs in JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dltrain.paths import MODEL_WEIGHTS

# To continue exactly: the raw, best and averaged weights (safetensors, names prefixed
# "model/", "best_model/", "ema/"), and the optimizer's state (torch.save of its state dict).
CHECKPOINT_STATE = "state.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_HISTORY = "history.json"  # one record per epoch so far
# The weights the stage ships, under the name models/ gives them.
CHECKPOINT_MODEL = MODEL_WEIGHTS


@dataclass(frozen=True)
class LoopConfig:
    processed_dir: str  # absolute: Ray workers change directory
    hidden_sizes: tuple[int, ...]
    epochs: int
    batch_size: int  # global
    learning_rate: float
    optimizer: str
    seed: int
    threads: int | None = None
    ema_decay: float = 0.0  # 0 = off; else the per-step decay of the averaged weights


def best_epoch(history: list[dict[str, Any]]) -> int | None:
    """The epoch with the best validation accuracy (the earliest of a tie), or None."""
    if not history:
        return None
    return max(history, key=lambda e: (e["val_accuracy"], -e["epoch"]))["epoch"]
