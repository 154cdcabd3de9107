"""The evaluate stage's pictures: the confusion matrix, a grid of misclassified images and the
training curves.

matplotlib's object API with the Agg canvas: no pyplot global state, no display needed, no
pyplot import. Every figure has a fixed layout: bbox_inches="tight" draws a figure twice. The
misclassified grid is one composed image with its labels as text, not one Axes per image:
each Axes builds tick machinery that a grid of images never shows (BENCHMARKS.md, "Figures
behind choices in the code").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dltrain.atomic import atomic_path

GRID = 5  # the misclassified grid shows at most GRID x GRID images
# The grid's cells, in image pixels: a band for the cell's label above each 28 x 28 image,
# a margin on each side.
SIDE, BAND, MARGIN = 28, 12, 2


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_confusion_matrix(matrix: np.ndarray, names: tuple[str, ...], path: Path) -> None:
    """A heat map of confusion counts, row = actual, column = predicted, counts printed."""
    fig = Figure(figsize=(8, 7))
    # Room for the rotated class names below and the names on the left (the longest:
    # "T-shirt/top", "Ankle boot").
    fig.subplots_adjust(left=0.16, bottom=0.17, right=0.98, top=0.94)
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
    """The most confidently misclassified test images, each labelled with its true and predicted
    class and the prediction's probability."""
    wrong = np.flatnonzero(predictions != labels)
    # Most confident mistakes first: they say most about what the model gets wrong.
    shown = wrong[np.argsort(-confidence[wrong], kind="stable")][:GRID * GRID]
    cell_w, cell_h = SIDE + 2 * MARGIN, BAND + SIDE + MARGIN
    mosaic = np.full((GRID * cell_h, GRID * cell_w), 255, dtype=np.uint8)  # white between
    title_in = 0.5  # inches above the grid for the title
    width_in = 10.0
    height_in = width_in * mosaic.shape[0] / mosaic.shape[1] + title_in
    fig = Figure(figsize=(width_in, height_in))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - title_in / height_in))
    ax.set_axis_off()
    for slot, i in enumerate(shown):
        row, col = divmod(slot, GRID)
        top, left = row * cell_h + BAND, col * cell_w + MARGIN
        mosaic[top:top + SIDE, left:left + SIDE] = images[i]
        ax.text(left + SIDE / 2, top - 0.5, f"true: {names[labels[i]]}\npred: "
                f"{names[predictions[i]]} ({confidence[i]:.0%})",
                ha="center", va="bottom", fontsize=9)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect="auto",
              extent=(0, mosaic.shape[1], mosaic.shape[0], 0))
    fig.suptitle(f"{len(wrong)} of {len(labels)} test images misclassified"
                 + (f" (the {len(shown)} most confident shown)" if len(wrong) else ""),
                 y=1.0 - 0.1 / height_in, va="top")
    _save(fig, path)


def plot_training_curves(epochs: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation, side by side: the curves of
    `dvc plots show` (which draws them with Vega from a CDN, blank offline) as a PNG."""
    fig = Figure(figsize=(11, 4.5))
    fig.subplots_adjust(left=0.07, bottom=0.13, right=0.98, top=0.86, wspace=0.25)
    x = [e["epoch"] for e in epochs]
    for ax, (title, ylabel, key) in zip(fig.subplots(1, 2), (
            ("Loss", "cross-entropy loss", "loss"), ("Accuracy", "accuracy", "accuracy")),
            strict=True):
        for split, style in (("train", "o-"), ("val", "s--")):
            ys = [e.get(f"{split}_{key}") for e in epochs]
            points = [(a, b) for a, b in zip(x, ys, strict=True) if b is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style,
                        label="train" if split == "train" else "validation")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        # Whole epochs only: matplotlib would tick 1.5 (or 0.98 for one epoch) on a short run.
        if len(x) <= 20:
            ax.set_xticks(x)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Training curves ({len(epochs)} epoch{'' if len(epochs) == 1 else 's'})")
    _save(fig, path)
