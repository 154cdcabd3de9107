"""dltrain/data/preprocess.py: split sizes and stratification, determinism, the test split
untouched, memory-mappable outputs, and each bad input named with nothing written. Plus the real
Fashion-MNIST from Debian's package through both data stages (integration)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dltrain import cli
from dltrain.atomic import read_json, write_json
from dltrain.data.datasets import DEBIAN_FASHION_MNIST_DIR
from dltrain.data.download import download
from dltrain.data.idx import read_split, write_idx
from dltrain.data.preprocess import SPLITS, preprocess, stratified_split
from dltrain.errors import ConfigError, DataError
from dltrain.paths import RAW_MANIFEST as MANIFEST_NAME
from dltrain.paths import split_paths

from helpers.data import write_raw_dir

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


# --- what a training run is made of ----------------------------------------------------------

def test_another_split_of_the_same_raw_data_is_another_training_run(tmp_path: Path,
                                                                    raw_dir: Path):
    """The issue's case: the train stage killed after epoch 1, preprocess re-run with
    data.val_fraction 0.5, train again. Same raw data, other splits: another run key, so the
    re-run starts clean (never epoch 1 on 540 samples and epochs 2-3 on 300), and says why."""
    from dltrain.config import Params
    from dltrain.train.preflight import fresh_reason, run_inputs, run_key
    from dltrain.train.storage import swap_last_run

    first = run(raw_dir, tmp_path / "a", val_fraction=0.1)
    second = run(raw_dir, tmp_path / "b", val_fraction=0.5)
    assert first["data_checksum"] == second["data_checksum"]  # the raw data did not change
    params = Params()
    assert run_key(params, first) == run_key(params, dict(first))
    assert run_key(params, first) != run_key(params, second)
    other_params = params.model_copy(update={"train": params.train.model_copy(
        update={"epochs": 2})})
    assert run_key(other_params, first) != run_key(params, first)

    storage = tmp_path / "ray_results"
    storage.mkdir()
    old, new = f"dltrain-{run_key(params, first)}", f"dltrain-{run_key(params, second)}"
    assert swap_last_run(str(storage), old, run_inputs(params, first)) is None
    (storage / old).mkdir()  # its checkpoints, and no complete marker: interrupted
    previous = swap_last_run(str(storage), new, run_inputs(params, second))
    reason = fresh_reason(previous, new, run_inputs(params, second))
    assert reason == (f"starting fresh: the interrupted run {old} is not resumed, it was made "
                      "of other inputs (data.train, data.val)")
    assert fresh_reason(previous, old, run_inputs(params, first)) is None  # the same run


# --- test labels out of range: one line, not a traceback -------------------------------------

@pytest.mark.parametrize("bad", [10, 255], ids=["10", "-1-as-uint8"])
def test_out_of_range_test_labels_are_one_line_naming_the_file(
        tmp_path: Path, raw_dir: Path, capsys: pytest.CaptureFixture[str], bad: int):
    labels = read_split(raw_dir / "t10k-images-idx3-ubyte.gz",
                        raw_dir / "t10k-labels-idx1-ubyte.gz")[1].copy()
    labels[5] = bad
    write_idx(raw_dir / "t10k-labels-idx1-ubyte.gz", labels)
    (tmp_path / "params.yaml").write_text("{}\n")
    assert cli.main(["preprocess", "--workspace", str(tmp_path)]) == DataError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "t10k-labels-idx1-ubyte.gz" in err and f"{bad} (expected 0..9)" in err
    assert not (tmp_path / "data" / "processed").exists()


# --- litter of killed runs -----------------------------------------------------------------

HOLD_STAGING = """
import sys, time
from pathlib import Path
from dltrain.atomic import atomic_dir
with atomic_dir(Path(sys.argv[1])) as staging:
    (staging / "train_images.npy").write_bytes(bytes(1 << 16))
    print(staging.name, flush=True)
    time.sleep(120)
"""


def _hold_staging(processed: Path) -> tuple[subprocess.Popen, Path]:
    """A process with a staging folder of `processed` open, as preprocess has mid-write."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_STAGING, str(processed)],
                            stdout=subprocess.PIPE, text=True)
    return proc, processed.parent / proc.stdout.readline().strip()


def test_staging_folders_of_killed_runs_are_removed_by_the_next_run_and_live_ones_kept(
        tmp_path: Path, raw_dir: Path, capsys: pytest.CaptureFixture[str]):
    """A SIGKILL mid-write leaves the staging folder (its name carries the owner's pid). The
    next preprocess removes it; a running writer's folder is left alone."""
    processed = tmp_path / "data" / "processed"
    killed, killed_staging = _hold_staging(processed)
    live, live_staging = _hold_staging(processed)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed_staging.is_dir() and live_staging.is_dir()
        assert str(killed.pid) in killed_staging.name
        run(raw_dir, processed)
        assert not killed_staging.exists()
        assert live_staging.is_dir()  # its owner is running: not ours to remove
        assert "cleaned up 1 staging folder" in capsys.readouterr().err
        assert sorted(p.name for p in processed.parent.iterdir()) == sorted(
            ["processed", "raw", live_staging.name])
    finally:
        live.kill()
        live.wait(timeout=30)
        killed.stdout.close()
        live.stdout.close()


def test_a_run_killed_between_the_two_renames_gets_its_previous_output_back(
        tmp_path: Path, raw_dir: Path):
    """The previous data/processed moved aside, the new one not yet in place, then SIGKILL:
    the next run puts the previous one back before it starts (and then replaces it)."""
    processed = tmp_path / "data" / "processed"
    run(raw_dir, processed)
    before = snapshot(processed)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    aside = processed.with_name(f".processed.{int(dead.stdout)}.old-0badc0de.tmp")
    os.replace(processed, aside)
    from dltrain.atomic import remove_stale_staging

    assert remove_stale_staging(processed) == [aside]
    assert snapshot(processed) == before and not aside.exists()


# --- an output directory that cannot be written ----------------------------------------------

@pytest.fixture(params=["read-only", "not-a-directory"])
def unwritable_data(request, tmp_path: Path, tiny_source: Path):
    """A workspace whose data/ refuses writes, for real whoever runs the tests: a read-only
    file system (a tmpfs remounted ro, as root; a directory without write permission for
    anyone else), or data/ being a regular file. Yields (workspace, data/)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(f"data:\n  source: {tiny_source}\n")
    data = ws / "data"
    if request.param == "not-a-directory":
        data.write_text("not a directory\n")
        yield ws, data
        return
    make_raw(ws, tiny_source)
    if os.geteuid() != 0:
        data.chmod(0o555)  # binding for a non-root user
        try:
            yield ws, data
        finally:
            data.chmod(0o755)
        return
    raw_copy = tmp_path / "raw"
    shutil.copytree(data / "raw", raw_copy)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(data)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"root cannot mount a tmpfs here ({done.stderr.strip()}), and root writes "
                    "through permissions; the not-a-directory case still runs")
    try:
        shutil.copytree(raw_copy, data / "raw")
        subprocess.run(["mount", "-o", "remount,ro", str(data)], check=True)
        yield ws, data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


@pytest.mark.parametrize("stage", ["preprocess", "download"])
def test_an_unwritable_data_directory_is_one_line_naming_it(
        unwritable_data, stage: str, capsys: pytest.CaptureFixture[str]):
    ws, data = unwritable_data
    if stage == "preprocess" and data.is_file():
        # Its input is missing too: that is what it must say first.
        expected = ["data/raw/manifest.json", "not found"]
    else:
        expected = [f"cannot write {data / ('raw' if stage == 'download' else 'processed')}",
                    f"{data} ", "nothing was written"]
    files_before = sorted(str(p) for p in ws.rglob("*"))
    code = cli.main([stage, "--workspace", str(ws)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    for word in expected:
        assert word in err, (word, err)
    assert sorted(str(p) for p in ws.rglob("*")) == files_before


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
