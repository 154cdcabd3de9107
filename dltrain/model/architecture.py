"""The MLP's shape, without torch: its input and output sizes, the architecture that
models/model.json records, and the tensor shapes that architecture holds. The torch module
(dltrain.model.mlp), the numpy reader (dltrain.model.weights) and the class names all read them
from here.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

# 28x28 grey images in, one logit per class out.
INPUT_SIZE = 28 * 28
NUM_CLASSES = 10


def architecture(hidden_sizes: Sequence[int]) -> dict:
    """What models/model.json records so that a loader can rebuild the module."""
    return {"type": "mlp", "input_size": INPUT_SIZE, "hidden_sizes": list(hidden_sizes),
            "num_classes": NUM_CLASSES, "activation": "relu", "output": "logits"}


def expected_shapes(hidden_sizes: Sequence[int], input_size: int = INPUT_SIZE,
                    num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """The state dict shapes of dltrain.model.mlp.MLP(hidden_sizes): its nn.Sequential `net`
    holds Linear, ReLU, Linear, ..., so the Linear layers are net.0, net.2, net.4, ..."""
    widths = [input_size, *hidden_sizes, num_classes]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        shapes[f"net.{2 * layer}.weight"] = (fan_out, fan_in)
        shapes[f"net.{2 * layer}.bias"] = (fan_out,)
    return shapes
