"""The IDX format of the MNIST files: parse with validation, and write (for fixtures and
synthetic benchmark data).

An IDX file is a 4-byte magic number (0, 0, dtype code, number of dimensions), one big-endian
uint32 per dimension, then the data. MNIST and Fashion-MNIST use dtype 0x08 (uint8): images
are (N, 28, 28) and labels (N,). Files may be gzipped.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dltrain.errors import DataError

UINT8 = 0x08
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


# The most data one IDX file may declare: Fashion-MNIST's training images are 47 MB. A forged
# header (or a gzip bomb: a few MB that inflate to GBs) is refused before it is read.
MAX_DATA_BYTES = 1 << 30
CHUNK = 1 << 20


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (plain or gzipped) into a uint8 array, validating its header and size.

    `ndim`, when given, is the number of dimensions the caller expects (3 for images, 1 for
    labels). Every defect raises DataError naming the file and the defect. The file is
    streamed: the header is read first, then exactly the bytes it declares (at most
    MAX_DATA_BYTES), then one more to tell a file that is too long; so memory and time are
    bounded by the declared size, however far a gzip stream would inflate.
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
            with stream:
                shape = _read_header(path, stream, ndim)
                data = _read_data(path, stream, shape)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable (gzipped) IDX file: {exc}") from exc
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _read_header(path: Path, stream: BinaryIO, ndim: int | None) -> tuple[int, ...]:
    magic = stream.read(4)
    if len(magic) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(magic)} bytes)")
    zero1, zero2, dtype, dims = magic
    if zero1 != 0 or zero2 != 0 or dtype != UINT8 or not 1 <= dims <= 4:
        raise DataError(f"{path}: bad IDX magic number 0x{magic.hex()} "
                        f"(expected 0x000008 followed by the number of dimensions, uint8 data)")
    if ndim is not None and dims != ndim:
        raise DataError(f"{path}: has {dims} dimensions, expected {ndim}")
    sizes = stream.read(4 * dims)
    if len(sizes) < 4 * dims:
        raise DataError(f"{path}: truncated IDX header")
    return struct.unpack(f">{dims}I", sizes)


def _read_data(path: Path, stream: BinaryIO, shape: tuple[int, ...]) -> bytearray:
    expected = math.prod(shape)  # exact: np.prod in int64 wraps on a forged header
    if expected > MAX_DATA_BYTES:
        raise DataError(f"{path}: header declares shape {shape} ({expected} bytes), more than "
                        f"the {MAX_DATA_BYTES} bytes an IDX file may hold here; not read")
    data = bytearray()
    while len(data) < expected:
        chunk = stream.read(min(CHUNK, expected - len(data)))
        if not chunk:
            raise DataError(f"{path}: data is short: header says shape {shape} "
                            f"({expected} bytes), file holds {len(data)} bytes")
        data += chunk
    if stream.read(1):  # one byte past the declared data: never inflate the rest
        raise DataError(f"{path}: data is too long: header says shape {shape} "
                        f"({expected} bytes), file holds more; not read further")
    return data


def read_images(path: Path) -> np.ndarray:
    """Images as (N, 28, 28) uint8."""
    images = read_idx(path, ndim=3)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{path}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"expected {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    return images


def read_labels(path: Path) -> np.ndarray:
    """Labels as (N,) uint8, each in 0..9."""
    labels = read_idx(path, ndim=1)
    if labels.size and labels.max() >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"{path}: label out of range at index {bad}: {int(labels[bad])} "
                        f"(expected 0..{NUM_CLASSES - 1})")
    return labels


def read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split, checked to hold the same number of samples."""
    images, labels = read_images(images_path), read_labels(labels_path)
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: holds {len(labels)} labels but {images_path} holds "
                        f"{len(images)} images; the counts must match")
    return images, labels


def write_idx(path: Path, array: np.ndarray, compress: bool | None = None) -> None:
    """Write a uint8 array as IDX; gzipped when `compress` (default: when the name ends .gz)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, UINT8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        # mtime=0: the same array always gives the same bytes.
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
