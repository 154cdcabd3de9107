"""Human-readable class names for the data sets dltrain knows, for plots and predictions."""

from __future__ import annotations

# dltrain.weights, not dltrain.model: the evaluate and register stages run without torch.
from dltrain.weights import NUM_CLASSES

# Fashion-MNIST's label order, from the data set's README (zalandoresearch/fashion-mnist).
FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST = tuple(str(d) for d in range(NUM_CLASSES))

_BY_DATASET = {"fashion-mnist": FASHION_MNIST, "mnist": MNIST}


def class_names(dataset: str | None) -> tuple[str, ...]:
    """The ten class names of `dataset`; plain indices ("0".."9") when it is unknown."""
    return _BY_DATASET.get(dataset or "", MNIST)
