"""The seed's model: an MLP 784 -> hidden_sizes -> 10 with ReLU.

It returns logits; cross-entropy on logits is the numerically stable equivalent of the seed's
softmax output with categorical cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dltrain.model.architecture import INPUT_SIZE, NUM_CLASSES


class MLP(nn.Module):
    def __init__(self, hidden_sizes: Sequence[int] = (512,), input_size: int = INPUT_SIZE,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)
        self.hidden_sizes = tuple(hidden_sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [0, 255] -> float32 [0, 1], flattened to (N, 784), as the seed program does."""
    return images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
