"""The evaluate stage's pictures: the confusion matrix and a grid of misclassified images.

matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dltrain.io import atomic_path

GRID = 5  # the misclassified grid shows at most GRID x GRID images


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def plot_confusion_matrix(matrix: np.ndarray, names: tuple[str, ...], path: Path) -> None:
    """A heat map of confusion counts, row = actual, column = predicted, counts printed."""
    fig = Figure(figsize=(8, 7))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Confusion matrix (test set)")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > threshold else "black")
    _save(fig, path)


def plot_misclassified(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                       confidence: np.ndarray, names: tuple[str, ...], path: Path) -> None:
    """The most confidently misclassified test images, each titled with true and predicted class."""
    wrong = np.flatnonzero(predictions != labels)
    # Most confident mistakes first: they say most about what the model gets wrong.
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:GRID * GRID]
    fig = Figure(figsize=(2 * GRID, 2.3 * GRID))
    fig.suptitle(f"{len(wrong)} of {len(labels)} test images misclassified"
                 + (f" (the {len(shown)} most confident shown)" if len(wrong) else ""))
    for slot in range(GRID * GRID):
        ax = fig.add_subplot(GRID, GRID, slot + 1)
        ax.axis("off")
        if slot < len(shown):
            i = shown[slot]
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"true: {names[labels[i]]}\npred: {names[predictions[i]]} "
                         f"({confidence[i]:.0%})", fontsize=8)
    _save(fig, path)
