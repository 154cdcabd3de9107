"""The data sets dltrain knows: their four IDX files, checksums and an ordered list of mirrors.

File names, archive md5s and public mirrors come from torchvision's own dataset classes
(`torchvision.datasets.MNIST` / `FashionMNIST`, attributes `resources` and `mirrors`), so they
follow torchvision's upkeep instead of being copied here. torchvision imports torch (seconds),
so it is imported only when a data set's spec is asked for, never at module import.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from dltrain.errors import ConfigError

# The four standard files, by role. Every MNIST-format data set uses the same names.
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
RAW_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# Debian's package `dataset-fashion-mnist` installs the four files here: first in the list, so
# that machines without internet (CI included) never wait on the network.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# md5 of each file's *decompressed* IDX content, as published with the data sets. A mirror may
# re-pack the same data in a different gzip header: Debian's files have the original file
# name and mtime stripped (reproducible builds), so their archive md5 differs from
# torchvision's while the data are identical. A file passes if either md5 matches.
_CONTENT_MD5 = {
    "mnist": {
        TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
        TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
        TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
        TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
        TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
        TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

# The size in bytes of each file as published (torchvision's mirrors): what bounds a download
# from the known mirrors, which send no more than the cap (twice this: room for a mirror that
# re-packs the same data, as Debian's package does) before the md5 decides.
_PUBLISHED_BYTES = {
    "mnist": {
        TRAIN_IMAGES: 9912422, TRAIN_LABELS: 28881, TEST_IMAGES: 1648877, TEST_LABELS: 4542,
    },
    "fashion-mnist": {
        TRAIN_IMAGES: 26421880, TRAIN_LABELS: 29515, TEST_IMAGES: 4422102, TEST_LABELS: 5148,
    },
}

_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_LOCAL_MIRRORS = {"fashion-mnist": [DEBIAN_FASHION_MNIST_DIR], "mnist": []}


@dataclass(frozen=True)
class RawFile:
    name: str
    md5: str  # of the .gz archive as published (torchvision's `resources`)
    content_md5: str  # of the decompressed IDX bytes
    size: int | None = None  # of the .gz archive as published; None: not known

    @property
    def max_bytes(self) -> int | None:
        """The most bytes a mirror may send for this file (None: no bound of its own)."""
        return None if self.size is None else 2 * self.size


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[RawFile, ...]
    mirrors: tuple[str, ...]  # tried in order: directories, file:// or http(s):// URLs
    classes: tuple[str, ...]


def dataset_names() -> tuple[str, ...]:
    return tuple(_TORCHVISION_CLASS)


def check_dataset_name(name: str) -> None:
    if name not in _TORCHVISION_CLASS:
        near = difflib.get_close_matches(str(name).lower(), _TORCHVISION_CLASS, n=1)
        raise ConfigError(f"unknown data set {name!r} for data.dataset"
                          + (f" (did you mean {near[0]!r}?)" if near else "")
                          + "; expected one of: " + ", ".join(_TORCHVISION_CLASS))


def content_md5s(name: str) -> dict[str, str]:
    """The md5 of each of data set `name`'s four files' decompressed content, by file name.
    Needs no torchvision (no torch import), so the freshness check can use it."""
    check_dataset_name(name)
    return dict(_CONTENT_MD5[name])


@functools.cache
def get_spec(name: str) -> DatasetSpec:
    """The files, checksums and ordered mirrors of data set `name` ('fashion-mnist', 'mnist')."""
    check_dataset_name(name)
    from torchvision.datasets import mnist as tv_mnist

    cls = getattr(tv_mnist, _TORCHVISION_CLASS[name])
    archive_md5 = dict(cls.resources)
    # torchvision lists the same four names; a future release that renamed them would make
    # every lookup below fail, so say so plainly instead of with a KeyError.
    if set(archive_md5) != set(RAW_FILES):
        raise AssertionError(f"torchvision {cls.__name__}.resources lists {sorted(archive_md5)}, "
                             f"expected {sorted(RAW_FILES)}")
    files = tuple(RawFile(n, archive_md5[n], _CONTENT_MD5[name][n], _PUBLISHED_BYTES[name][n])
                  for n in RAW_FILES)
    mirrors = tuple(_LOCAL_MIRRORS[name]) + tuple(cls.mirrors)
    return DatasetSpec(name, files, mirrors, tuple(cls.classes))
