"""dltrain/preprocess.py: split sizes and stratification, determinism, the test split untouched,
memory-mappable outputs, and each bad input named with nothing written. Plus the real
Fashion-MNIST from Debian's package through both data stages (integration)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dltrain.datasets import DEBIAN_FASHION_MNIST_DIR, MANIFEST_NAME
from dltrain.download import download
from dltrain.errors import ConfigError, DataError
from dltrain.idx import read_split, write_idx
from dltrain.io import read_json, write_json
from dltrain.preprocess import SPLITS, preprocess, split_paths, stratified_split

from conftest import write_raw_dir

OUTPUT_NAMES = sorted([f"{s}_{k}.npy" for s in SPLITS for k in ("images", "labels")]
                      + ["summary.json"])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def make_raw(tmp_path: Path, source: Path, dataset: str = "fashion-mnist") -> Path:
    """data/raw as the download stage leaves it (manifest included), from `source`."""
    raw_dir = tmp_path / "data" / "raw"
    download(dataset, str(source), raw_dir, progress=False)
    return raw_dir


@pytest.fixture
def raw_dir(tmp_path: Path, tiny_source: Path) -> Path:
    return make_raw(tmp_path, tiny_source)  # 600 train, 200 test


def run(raw_dir: Path, processed_dir: Path, **overrides) -> dict:
    kwargs = {"dataset": "fashion-mnist", "val_fraction": 0.1, "seed": 42} | overrides
    return preprocess(raw_dir, processed_dir, **kwargs)


def test_writes_the_splits_and_summary(tmp_path: Path, raw_dir: Path):
    processed = tmp_path / "data" / "processed"
    summary = run(raw_dir, processed)
    assert sorted(p.name for p in processed.iterdir()) == OUTPUT_NAMES
    assert read_json(processed / "summary.json") == summary
    assert summary["dataset"] == "fashion-mnist"
    assert (summary["val_fraction"], summary["seed"]) == (0.1, 42)
    assert summary["data_checksum"] == read_json(raw_dir / MANIFEST_NAME)["checksum"]
    per_class = np.bincount(read_split(raw_dir / "train-images-idx3-ubyte.gz",
                                       raw_dir / "train-labels-idx1-ubyte.gz")[1], minlength=10)
    expected_val = [int(round(0.1 * c)) for c in per_class]
    assert summary["val"]["class_counts"] == expected_val
    assert summary["train"]["class_counts"] == list(per_class - expected_val)
    assert summary["val"]["n"] == sum(expected_val) == pytest.approx(60, abs=5)
    assert summary["train"]["n"] + summary["val"]["n"] == 600
    assert summary["test"]["n"] == 200
    for split in SPLITS:
        images_path, labels_path = split_paths(processed, split)
        images = np.load(images_path, mmap_mode="r")  # what the training workers do
        labels = np.load(labels_path, mmap_mode="r")
        assert isinstance(images, np.memmap) and isinstance(labels, np.memmap)
        assert images.dtype == labels.dtype == np.uint8
        assert images.shape == (summary[split]["n"], 28, 28)
        assert labels.shape == (summary[split]["n"],)
        assert list(np.bincount(labels, minlength=10)) == summary[split]["class_counts"]
        digest = hashlib.sha256(images_path.read_bytes() + labels_path.read_bytes())
        assert summary[split]["sha256"] == digest.hexdigest()


def test_train_and_val_partition_the_training_file_in_order_and_test_is_untouched(
        tmp_path: Path, raw_dir: Path):
    processed = tmp_path / "processed"
    run(raw_dir, processed, val_fraction=0.25, seed=3)
    images, labels = read_split(raw_dir / "train-images-idx3-ubyte.gz",
                                raw_dir / "train-labels-idx1-ubyte.gz")
    train_idx, val_idx = stratified_split(labels, 0.25, 3)
    assert np.intersect1d(train_idx, val_idx).size == 0
    np.testing.assert_array_equal(np.union1d(train_idx, val_idx), np.arange(len(labels)))
    for split, idx in (("train", train_idx), ("val", val_idx)):
        assert np.all(np.diff(idx) > 0), "indices sorted: the original order is kept"
        np.testing.assert_array_equal(np.load(split_paths(processed, split)[0]), images[idx])
        np.testing.assert_array_equal(np.load(split_paths(processed, split)[1]), labels[idx])
    test_images, test_labels = read_split(raw_dir / "t10k-images-idx3-ubyte.gz",
                                          raw_dir / "t10k-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(np.load(split_paths(processed, "test")[0]), test_images)
    np.testing.assert_array_equal(np.load(split_paths(processed, "test")[1]), test_labels)


@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.5])
def test_split_is_stratified_on_unbalanced_classes(tmp_path: Path, val_fraction: float):
    counts = [100, 50, 20, 10, 7, 33, 64, 5, 12, 41]
    labels = np.repeat(np.arange(10, dtype=np.uint8), counts)
    np.random.default_rng(0).shuffle(labels)
    source = tmp_path / "source"
    write_raw_dir(source)
    write_idx(source / "train-images-idx3-ubyte.gz",
              np.zeros((len(labels), 28, 28), dtype=np.uint8))
    write_idx(source / "train-labels-idx1-ubyte.gz", labels)
    summary = run(make_raw(tmp_path, source), tmp_path / "processed", val_fraction=val_fraction)
    expected_val = [int(round(val_fraction * c)) for c in counts]
    assert summary["val"]["class_counts"] == expected_val
    assert summary["train"]["class_counts"] == [c - v for c, v in zip(counts, expected_val,
                                                                     strict=True)]


def test_same_inputs_and_params_give_byte_identical_outputs(tmp_path: Path, raw_dir: Path):
    first, second = tmp_path / "p1", tmp_path / "p2"
    run(raw_dir, first)
    run(raw_dir, second)
    assert snapshot(first) == snapshot(second)
    run(raw_dir, first)  # and a rerun in place replaces it with the same bytes
    assert snapshot(first) == snapshot(second)


def test_another_seed_gives_another_val_set_of_the_same_shape(tmp_path: Path, raw_dir: Path):
    a = run(raw_dir, tmp_path / "a", seed=1)
    b = run(raw_dir, tmp_path / "b", seed=2)
    assert a["val"]["class_counts"] == b["val"]["class_counts"]
    assert a["val"]["sha256"] != b["val"]["sha256"]
    assert a["test"]["sha256"] == b["test"]["sha256"]


# --- bad inputs: a message naming the cause, nothing written -----------------------------------

def _break_train_images_magic(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte.gz"
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[2] = 0x09  # int32 data: not MNIST
    path.write_bytes(bytes(data))  # plain, not gzipped: the reader takes both


def _short_test_images(raw: Path) -> None:
    path = raw / "t10k-images-idx3-ubyte.gz"
    images, _ = read_split(path, raw / "t10k-labels-idx1-ubyte.gz")
    header = bytes([0, 0, 8, 3]) + (200).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path.write_bytes(header + images.tobytes()[:-1])


def _label_out_of_range(raw: Path) -> None:
    labels = np.zeros(600, dtype=np.uint8)
    labels[17] = 12
    write_idx(raw / "train-labels-idx1-ubyte.gz", labels)


def _count_mismatch(raw: Path) -> None:
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.zeros(199, dtype=np.uint8))


def _missing_file(raw: Path) -> None:
    (raw / "t10k-labels-idx1-ubyte.gz").unlink()


def _missing_manifest(raw: Path) -> None:
    (raw / MANIFEST_NAME).unlink()


def _manifest_of_another_data_set(raw: Path) -> None:
    manifest = read_json(raw / MANIFEST_NAME)
    manifest["dataset"] = "mnist"
    write_json(raw / MANIFEST_NAME, manifest)


BAD_RAW = [
    (_break_train_images_magic, DataError, ["train-images-idx3-ubyte.gz", "magic"]),
    (_short_test_images, DataError, ["t10k-images-idx3-ubyte.gz", "short"]),
    (_label_out_of_range, DataError, ["train-labels-idx1-ubyte.gz", "out of range", "12"]),
    (_count_mismatch, DataError, ["t10k-labels-idx1-ubyte.gz", "199 labels", "200 images"]),
    (_missing_file, DataError, ["t10k-labels-idx1-ubyte.gz", "not found"]),
    (_missing_manifest, DataError, [MANIFEST_NAME, "dltrain download"]),
    (_manifest_of_another_data_set, DataError, ["'mnist'", "'fashion-mnist'", "data.dataset"]),
]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "over-previous-output"])
@pytest.mark.parametrize(("breakage", "error", "words"), BAD_RAW,
                         ids=[b[0].__name__.strip("_") for b in BAD_RAW])
def test_bad_raw_input_names_the_cause_and_writes_nothing(
        tmp_path: Path, raw_dir: Path, breakage, error, words, existing: bool):
    processed = tmp_path / "data" / "processed"
    if existing:
        run(raw_dir, processed)
    before = snapshot(processed) if existing else None
    parent_before = sorted(p.name for p in processed.parent.iterdir())
    breakage(raw_dir)
    with pytest.raises(error) as info:
        run(raw_dir, processed)
    for word in words:
        assert word in str(info.value)
    assert (snapshot(processed) if processed.exists() else None) == before
    assert sorted(p.name for p in processed.parent.iterdir()) == parent_before  # no temp left


@pytest.mark.parametrize(("val_fraction", "error", "words"), [
    (0.0, ConfigError, ["data.val_fraction"]),
    (1.0, ConfigError, ["data.val_fraction"]),
    (0.001, DataError, ["data.val_fraction=0.001", "empty val split"]),
    (0.999, DataError, ["data.val_fraction=0.999", "empty train split"]),
])
def test_a_val_fraction_that_leaves_a_split_empty_is_refused(
        tmp_path: Path, raw_dir: Path, val_fraction: float, error, words):
    with pytest.raises(error) as info:
        run(raw_dir, tmp_path / "processed", val_fraction=val_fraction)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "processed").exists()


# --- the real data set ------------------------------------------------------------------------

@pytest.mark.integration
def test_real_fashion_mnist_from_the_debian_package(tmp_path: Path):
    """Both data stages on the real files, with the default mirror list (the Debian directory
    comes first, so no network is used)."""
    if not Path(DEBIAN_FASHION_MNIST_DIR).is_dir():
        message = (f"{DEBIAN_FASHION_MNIST_DIR} is missing: install Debian's "
                   "dataset-fashion-mnist (make data-package)")
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a skip there would hide a broken set-up
        pytest.skip(message)
    raw_dir, processed = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    manifest = download("fashion-mnist", None, raw_dir, progress=False)
    for name, entry in manifest["files"].items():
        assert entry["verified"] in ("md5", "content-md5"), name  # the md5 checks passed
        assert entry["source"] == f"{DEBIAN_FASHION_MNIST_DIR}/{name}"
    summary = preprocess(raw_dir, processed, dataset="fashion-mnist", val_fraction=0.1, seed=42)
    assert summary["train"]["n"] + summary["val"]["n"] == 60_000
    assert summary["test"]["n"] == 10_000
    assert [t + v for t, v in zip(summary["train"]["class_counts"],
                                  summary["val"]["class_counts"], strict=True)] == [6000] * 10
    assert summary["val"]["class_counts"] == [600] * 10
    assert summary["test"]["class_counts"] == [1000] * 10
    assert json.loads((processed / "summary.json").read_text()) == summary
