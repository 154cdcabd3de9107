"""Shared fixtures: tiny synthetic MNIST-shaped data sets that a model can learn in seconds.

Class k is a bright 7x7 block at a position that depends on k, plus noise, so a tiny MLP
reaches high accuracy in a couple of epochs and a broken training loop does not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dltrain.data.idx import write_idx

REPO_ROOT = Path(__file__).resolve().parent.parent
RAW_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
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


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """A directory holding the four gzipped IDX files of a tiny synthetic data set."""
    return write_raw_dir(tmp_path / "source")


@pytest.fixture(scope="session")
def tiny_source_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_raw_dir(tmp_path_factory.mktemp("source"))


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """A git clone of the working tree (uncommitted changes included), as a new user gets it:
    the tracked files plus the untracked, non-ignored ones."""
    return make_clone(tmp_path / "clone")


def make_clone(clone: Path) -> Path:
    """fresh_clone's work, for fixtures of a wider scope."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, check=True, capture_output=True).stdout.split(b"\0")
    for rel in filter(None, files):
        src = REPO_ROOT / rel.decode()
        if src.is_file():
            dst = clone / rel.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(git + ["init", "-q", "-b", "main"], cwd=clone, check=True)
    subprocess.run(git + ["add", "-A"], cwd=clone, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "snapshot"], cwd=clone, check=True)
    return clone


def venv_env(**extra: str) -> dict[str, str]:
    """The environment for subprocesses: the venv's bin first on PATH (dvc, dltrain)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def make_processed(root: Path, n_train: int = 600, n_test: int = 200,
                   dataset: str = "fashion-mnist") -> Path:
    """A workspace under `root` with data/raw and data/processed made by the real download and
    preprocess stages from a tiny synthetic source."""
    from dltrain.data.download import download
    from dltrain.data.preprocess import preprocess

    source = write_raw_dir(root / "source", n_train=n_train, n_test=n_test)
    ws = root / "ws"
    download(dataset, str(source), ws / "data" / "raw", progress=False)
    preprocess(ws / "data" / "raw", ws / "data" / "processed", dataset=dataset,
               val_fraction=0.1, seed=0)
    return ws


@pytest.fixture(scope="session")
def processed_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace holding tiny processed data (shared: tests must not write into it)."""
    return make_processed(tmp_path_factory.mktemp("processed"))
