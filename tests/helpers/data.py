"""Tiny synthetic MNIST-shaped data that a model learns in seconds: raw IDX files as the
download stage fetches them, and data/processed as the preprocess stage writes it.

Class k is a bright 7x7 block at a position that depends on k, plus noise, so a tiny MLP
reaches high accuracy in a couple of epochs and a broken training loop does not.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dltrain.atomic import read_json, write_json
from dltrain.data.datasets import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from dltrain.data.idx import write_idx
from dltrain.paths import Workspace

# The four raw files by role, under the names the product gives them.
RAW_FILES = {
    "train_images": TRAIN_IMAGES,
    "train_labels": TRAIN_LABELS,
    "test_images": TEST_IMAGES,
    "test_labels": TEST_LABELS,
}


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n learnable 28x28 uint8 images and their labels, 10 balanced classes."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = 3 + 8 * (int(k) // 4), 1 + 7 * (int(k) % 4)
        images[i, r:r + 7, c:c + 6] = rng.integers(180, 256, size=(7, 6), dtype=np.uint8)
    return images, labels


def write_raw_dir(path: Path, n_train: int = 600, n_test: int = 200, gz: bool = True,
                  seed: int = 0) -> Path:
    """Write the four IDX files of a tiny synthetic data set into `path`."""
    path.mkdir(parents=True, exist_ok=True)
    train = synthetic_split(n_train, seed)
    test = synthetic_split(n_test, seed + 1)
    arrays = {"train_images": train[0], "train_labels": train[1],
              "test_images": test[0], "test_labels": test[1]}
    for key, name in RAW_FILES.items():
        write_idx(path / (name if gz else name.removesuffix(".gz")), arrays[key])
    return path


def make_processed(root: Path, n_train: int = 600, n_test: int = 200,
                   dataset: str = "fashion-mnist") -> Path:
    """A workspace under `root` with data/raw and data/processed made by the real download and
    preprocess stages from a tiny synthetic source, and an empty embedded MLflow store (the
    training's live tracking writes there)."""
    from dltrain.data.download import download
    from dltrain.data.preprocess import preprocess

    from helpers.mlflow import seed_workspace_store

    source = write_raw_dir(root / "source", n_train=n_train, n_test=n_test)
    ws = root / "ws"
    download(dataset, str(source), ws / "data" / "raw", progress=False)
    preprocess(ws / "data" / "raw", ws / "data" / "processed", dataset=dataset,
               val_fraction=0.1, seed=0)
    seed_workspace_store(ws)
    return ws


def split_sha256(path: Path, split: str) -> str:
    """A split's sha256 as preprocess records it: over its two .npy files' bytes, images first
    (evaluate checks the test split it reads against it)."""
    return hashlib.sha256((path / f"{split}_images.npy").read_bytes()
                          + (path / f"{split}_labels.npy").read_bytes()).hexdigest()


def _data_checksum(summary: dict) -> str:
    return hashlib.sha256(
        "".join(summary[s]["sha256"] for s in ("train", "val", "test")).encode()).hexdigest()


def write_processed_dir(path: Path, n_train: int = 600, n_val: int = 100, n_test: int = 200,
                        dataset: str = "fashion-mnist", seed: int = 0) -> Path:
    """The six .npy files and summary.json of data/processed, from synthetic data."""
    path.mkdir(parents=True, exist_ok=True)
    summary: dict = {"dataset": dataset, "val_fraction": 0.1, "seed": seed}
    for offset, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        images, labels = synthetic_split(n, seed + offset)
        np.save(path / f"{split}_images.npy", images)
        np.save(path / f"{split}_labels.npy", labels)
        summary[split] = {"n": n, "class_counts": np.bincount(labels, minlength=10).tolist(),
                          "sha256": split_sha256(path, split)}
    summary["data_checksum"] = _data_checksum(summary)
    write_json(path / "summary.json", summary)
    return path


def new_test_split(ws: Workspace, seed: int, n_test: int = 200) -> str:
    """Replace the workspace's processed test split with other images (as new data would),
    keeping train and val; returns the new test split's sha256."""
    processed_dir = ws.processed_dir
    images, labels = synthetic_split(n_test, seed)
    np.save(processed_dir / "test_images.npy", images)
    np.save(processed_dir / "test_labels.npy", labels)
    summary = read_json(processed_dir / "summary.json")
    digest = split_sha256(processed_dir, "test")
    summary["test"] = {"n": n_test, "class_counts": np.bincount(labels, minlength=10).tolist(),
                       "sha256": digest}
    summary["data_checksum"] = _data_checksum(summary)
    write_json(processed_dir / "summary.json", summary)
    return digest
