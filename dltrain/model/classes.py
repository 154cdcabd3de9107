"""Human-readable class names for the data sets dltrain knows, for plots and predictions."""

from __future__ import annotations

import re

from dltrain.model.architecture import NUM_CLASSES

# Fashion-MNIST's label order, from the data set's README (zalandoresearch/fashion-mnist).
FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST = tuple(str(d) for d in range(NUM_CLASSES))

_BY_DATASET = {"fashion-mnist": FASHION_MNIST, "mnist": MNIST}


def class_names(dataset: str | None) -> tuple[str, ...]:
    """The ten class names of `dataset`; plain indices ("0".."9") when it is unknown."""
    return _BY_DATASET.get(dataset or "", MNIST)


def class_key(index: int, name: str) -> str:
    """A metric-key-safe name for class `index` ([a-z0-9_] only): "class_0_tshirt_top" for
    "T-shirt/top", "class_3" for MNIST's "3". A "/" in an MLflow metric key starts a group in
    the UI, and other punctuation makes keys awkward to type and query; the display name is
    kept beside the key (per_class.json, the run's tags, the model card)."""
    # Joiners inside a word go ("T-shirt" -> "tshirt"); any other run of non-alphanumerics
    # becomes one underscore.
    slug = re.sub(r"[^a-z0-9]+", "_", re.sub(r"[-']", "", name.lower())).strip("_")
    return f"class_{index}" if slug in ("", str(index)) else f"class_{index}_{slug}"
