"""The preprocess stage: validated IDX in data/raw -> memory-mappable arrays in data/processed.

The training file is split into train and val, stratified by class and seeded; the test file
is kept as it is. Outputs are plain .npy files (uint8 images (N, 28, 28), uint8 labels (N,)),
which every training worker can np.load(..., mmap_mode="r") without a copy, and summary.json.
Everything is written into a staging directory that replaces data/processed at the end, so a
failure never leaves a half-written split behind. Same inputs and params, same bytes.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.atomic import atomic_dir, read_json, write_json
from dltrain.data.datasets import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
from dltrain.data.idx import NUM_CLASSES, read_split
from dltrain.errors import ConfigError, DataError
from dltrain.paths import ProcessedFiles, RawFiles

SPLITS = ("train", "val", "test")


def preprocess(raw_dir: Path, processed_dir: Path, *, dataset: str, val_fraction: float,
               seed: int) -> dict[str, Any]:
    """Parse and validate data/raw, split train/val, write data/processed; return the summary."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"invalid value for data.val_fraction: {val_fraction!r}; "
                          "expected a number strictly between 0 and 1")
    raw_dir, processed_dir = Path(raw_dir), Path(processed_dir)
    manifest = _read_manifest(raw_dir, dataset)
    train_images, train_labels = read_split(raw_dir / TRAIN_IMAGES, raw_dir / TRAIN_LABELS)
    test = read_split(raw_dir / TEST_IMAGES, raw_dir / TEST_LABELS)
    train_idx, val_idx = stratified_split(train_labels, val_fraction, seed)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise DataError(f"{raw_dir / TRAIN_LABELS}: {len(train_labels)} samples split with "
                        f"data.val_fraction={val_fraction} leave an empty "
                        f"{'val' if len(val_idx) == 0 else 'train'} split; "
                        "use a val_fraction that leaves samples on both sides")
    splits = {
        "train": (train_images[train_idx], train_labels[train_idx]),
        "val": (train_images[val_idx], train_labels[val_idx]),
        "test": test,  # untouched
    }
    summary: dict[str, Any] = {"dataset": dataset, "val_fraction": val_fraction, "seed": seed,
                               "data_checksum": manifest.get("checksum")}
    with atomic_dir(processed_dir) as staging:
        for split, (images, labels) in splits.items():
            summary[split] = _write_split(staging, split, images, labels)
        write_json(ProcessedFiles(staging).summary, summary)
    for split in SPLITS:
        images_path, labels_path = ProcessedFiles(processed_dir).split(split)
        print(f"preprocess: {split:<5} {summary[split]['n']:>6} samples -> "
              f"{images_path.name}, {labels_path.name}")
    return summary


def stratified_split(labels: np.ndarray, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val), each sorted: per class, a seeded permutation's first
    round(val_fraction * count) go to val. Classes are visited in order with one generator,
    so the result depends only on the labels, the fraction and the seed."""
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls in range(NUM_CLASSES):
        members = np.flatnonzero(labels == cls)
        n_val = int(round(val_fraction * len(members)))
        val_parts.append(members[rng.permutation(len(members))[:n_val]])
    val = np.sort(np.concatenate(val_parts)).astype(np.int64)
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), val


def _read_manifest(raw_dir: Path, dataset: str) -> dict[str, Any]:
    path = RawFiles(raw_dir).manifest
    try:
        manifest = read_json(path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DataError(f"{path}: not found; run `dltrain download` (or `dvc repro download`) "
                        "first") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({(exc.strerror or str(exc)).lower()})") from exc
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); run `dltrain download` again") from exc
    if not isinstance(manifest, dict) or manifest.get("dataset") != dataset:
        found = manifest.get("dataset") if isinstance(manifest, dict) else None
        raise DataError(f"{raw_dir} holds data set {found!r} but data.dataset is {dataset!r}; "
                        "run `dltrain download` for this data set (or fix data.dataset)")
    return manifest


def _write_split(staging: Path, split: str, images: np.ndarray,
                 labels: np.ndarray) -> dict[str, Any]:
    """Save one split as two .npy files; return its summary entry."""
    digest = hashlib.sha256()
    for path, array in zip(ProcessedFiles(staging).split(split), (images, labels), strict=True):
        payload = _npy_bytes(np.ascontiguousarray(array, dtype=np.uint8))
        path.write_bytes(payload)
        digest.update(payload)
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    return {"n": int(len(labels)), "class_counts": [int(c) for c in counts],
            "sha256": digest.hexdigest()}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
