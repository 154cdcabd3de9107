"""dltrain/data/idx.py: round trips, and each malformed file gives a DataError naming file and
defect."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dltrain.data.idx import read_idx, read_images, read_labels, read_split, write_idx
from dltrain.errors import DataError

from helpers.data import synthetic_split


@pytest.fixture
def split() -> tuple[np.ndarray, np.ndarray]:
    return synthetic_split(50, seed=3)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_round_trip_gzipped_and_plain(tmp_path: Path, split, suffix: str):
    images, labels = split
    write_idx(tmp_path / f"images{suffix}", images)
    write_idx(tmp_path / f"labels{suffix}", labels)
    assert (tmp_path / f"images{suffix}").read_bytes()[:2] == (b"\x1f\x8b" if suffix else b"\0\0")
    got_images, got_labels = read_split(tmp_path / f"images{suffix}", tmp_path / f"labels{suffix}")
    assert got_images.dtype == np.uint8 and got_images.shape == (50, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_gzipped_output_is_byte_stable(tmp_path: Path, split):
    write_idx(tmp_path / "a.gz", split[0])
    write_idx(tmp_path / "b.gz", split[0])
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def _raw(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _header(dtype: int, *shape: int) -> bytes:
    return bytes([0, 0, dtype, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


MALFORMED = [
    # (reader, file bytes, words the message must contain)
    (read_images, _header(0x08, 2, 28, 28)[:2], "too short"),
    (read_images, b"\x00\x00\x09\x03" + struct.pack(">3I", 1, 28, 28) + bytes(784), "magic"),
    (read_images, b"\x08\x03\x00\x00" + bytes(800), "magic"),
    (read_images, _header(0x08, 2, 28, 28)[:10], "truncated IDX header"),
    (read_images, _header(0x08, 2, 28, 28) + bytes(784 * 2 - 1), "short"),
    (read_images, _header(0x08, 2, 28, 28) + bytes(784 * 2 + 5), "too long"),
    (read_images, _header(0x08, 2, 784) + bytes(784 * 2), "2 dimensions, expected 3"),
    (read_images, _header(0x08, 2, 32, 32) + bytes(1024 * 2), "expected 28x28"),
    (read_labels, _header(0x08, 3) + bytes([1, 10, 2]), "label out of range at index 1: 10"),
    (read_labels, _header(0x08, 2, 2) + bytes(4), "2 dimensions, expected 1"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(("reader", "payload", "defect"), MALFORMED,
                         ids=[m[2] for m in MALFORMED])
def test_malformed_file_names_file_and_defect(tmp_path: Path, reader, payload, defect, gz):
    path = _raw(tmp_path / ("bad-idx.gz" if gz else "bad-idx"), payload, gz=gz)
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(path) in str(info.value)
    assert defect in str(info.value)


def test_truncated_gzip_is_a_data_error(tmp_path: Path, split):
    path = tmp_path / "images.gz"
    write_idx(path, split[0])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="not a readable") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="file not found") as info:
        read_labels(tmp_path / "nope.gz")
    assert "nope.gz" in str(info.value)


def test_image_and_label_counts_must_match(tmp_path: Path, split):
    images, labels = split
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels.gz", labels[:-1])
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "images.gz", tmp_path / "labels.gz")
    message = str(info.value)
    assert str(tmp_path / "labels.gz") in message and str(tmp_path / "images.gz") in message
    assert "49 labels" in message and "50 images" in message


# ----------------------------------------------------------------------------- gzip bombs

def _bomb(path: Path, header: bytes, inflated_gib: int) -> Path:
    """A gzip file whose stream is `header` then `inflated_gib` GiB of zeros: 16 MiB of zeros
    compressed once (16 KB) and repeated as gzip members, which a reader inflates one after
    the other. A 4 GiB stream is a 4 MB file, made in a fraction of a second."""
    member = gzip.compress(bytes(16 << 20), compresslevel=9, mtime=0)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(header, mtime=0))
        for _ in range(inflated_gib * 64):
            fh.write(member)
    return path


def test_a_gzip_bomb_under_a_real_header_stops_at_the_declared_size(tmp_path: Path):
    """The issue's bomb: a header that says 60000 images of 28x28 (47 MB), then 4 GiB of
    zeros. Reading stops one byte past the declared data: seconds and about the declared size
    in memory, not 4 GiB and a MemoryError."""
    import time
    import tracemalloc

    path = _bomb(tmp_path / "train-images-idx3-ubyte.gz", _header(0x08, 60000, 28, 28), 4)
    assert path.stat().st_size < 8 << 20
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DataError, match="too long") as info:
            read_images(path)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    assert elapsed < 10, elapsed
    assert peak < 200 << 20, peak  # 47 MB declared, read in 1 MiB chunks


def test_a_header_declaring_more_than_the_cap_is_refused_before_reading(tmp_path: Path):
    path = _bomb(tmp_path / "bomb.gz", _header(0x08, 0xFFFFFFFF, 28, 28), 1)
    with pytest.raises(DataError, match="more than the .* bytes an IDX file may hold") as info:
        read_images(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------- property-based
# Random bytes, mutated valid headers and truncated files: a DataError naming the file, or a
# valid array; never another exception, never a hang.

PROPERTY_SETTINGS = settings(max_examples=300, deadline=2000,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID_LABELS = bytes([0, 0, 8, 1]) + struct.pack(">I", 6) + bytes([1, 2, 3, 4, 5, 6])
VALID_IMAGES = bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 28, 28) + bytes(2 * 28 * 28)


def _parse(path: Path, payload: bytes, gz: bool) -> None:
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    for reader in (read_idx, read_images, read_labels):
        try:
            array = reader(path)
        except DataError as exc:
            assert str(path) in str(exc)
            continue
        assert array.dtype == np.uint8


@PROPERTY_SETTINGS
@given(payload=st.binary(max_size=300), gz=st.booleans())
@example(payload=b"\x1f\x8b" + bytes(20), gz=False)  # a gzip magic, then garbage (zlib.error)
@example(payload=bytes([0, 0, 8, 4]) + struct.pack(">4I", 65536, 65536, 65536, 65536),
         gz=False)  # a product of 2**64: wraps to 0 in int64
def test_random_bytes_are_parsed_or_a_data_error(tmp_path: Path, payload: bytes,
                                                  gz: bool) -> None:
    _parse(tmp_path / "random.idx", payload, gz)


@PROPERTY_SETTINGS
@given(base=st.sampled_from([VALID_LABELS, VALID_IMAGES]),
       edits=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, 2000), gz=st.booleans())
def test_mutated_headers_and_truncations_are_parsed_or_a_data_error(
        tmp_path: Path, base: bytes, edits: list[tuple[int, int]], cut: int, gz: bool) -> None:
    data = bytearray(base)
    for index, value in edits:
        if index < len(data):
            data[index] = value
    _parse(tmp_path / "mutated.idx", bytes(data[:cut]), gz)


@PROPERTY_SETTINGS
@given(cut=st.integers(0, 400))
def test_truncated_gzip_files_are_a_data_error(tmp_path: Path, cut: int) -> None:
    whole = gzip.compress(VALID_IMAGES, mtime=0)
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(whole[:min(cut, len(whole) - 1)])
    with pytest.raises(DataError, match="cut.idx.gz"):
        read_idx(path)
