"""Helpers shared by the benchmarks: a scratch workspace, a fresh clone, tiny synthetic data,
running `dltrain`, the machine. Benchmarks import the product, never the tests."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.processor() or platform.machine()}, {cpus} CPUs, {mem:.0f} GiB, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def workspace_with(processed_dir: Path, root: Path) -> Path:
    """A scratch workspace whose data/processed is a copy of `processed_dir`."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "data").mkdir(parents=True)
    shutil.copytree(processed_dir, root / "data" / "processed")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def run_stage(ws: Path, stage: str, *overrides: str,
              extra_env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run `dltrain <stage>` in a fresh process; returns (wall seconds, output)."""
    args = [str(BIN / "dltrain"), stage, "--workspace", str(ws)]
    for o in overrides:
        args += ["-S", o]
    started = time.perf_counter()
    out = subprocess.run(args, env={**env(), **(extra_env or {})}, capture_output=True,
                         text=True)
    wall = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return wall, out.stdout + out.stderr


@contextlib.contextmanager
def warm_ray(ray_dir: Path) -> Iterator[dict[str, str]]:
    """`make ray-up` with its state in `ray_dir`; yields the environment that points the train
    stage at it (DLTRAIN_RAY_DIR); `make ray-down` after, whatever happens."""
    extra = {"DLTRAIN_RAY_DIR": str(ray_dir)}
    make = ["make", "-s", "-C", str(REPO)]
    subprocess.run([*make, "ray-up"], env={**env(), **extra}, check=True)
    try:
        yield extra
    finally:
        subprocess.run([*make, "ray-down"], env={**env(), **extra}, check=False)


def training_report(ws: Path) -> dict:
    return json.loads((ws / "reports" / "training.json").read_text())


def ensure_processed(processed_dir: Path) -> Path:
    """The real Fashion-MNIST, processed: data/processed of the repo, made if missing."""
    if not (processed_dir / "summary.json").is_file():
        subprocess.run([str(BIN / "dvc"), "repro", "preprocess"], cwd=REPO, env=env(),
                       check=True)
    return processed_dir


def clone_worktree(clone: Path) -> Path:
    """A git clone of the working tree (uncommitted changes included): the tracked files plus
    the untracked, non-ignored ones, committed as one snapshot."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True).stdout.split(b"\0")
    for rel in filter(None, files):
        src = REPO / rel.decode()
        if src.is_file():
            dst = clone / rel.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=clone, check=True)
    subprocess.run([*git, "add", "-A"], cwd=clone, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot"], cwd=clone, check=True)
    return clone


def synthetic_raw(path: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """The four gzipped IDX files of a tiny MNIST-shaped data set in `path`, one a model learns
    in seconds: class k is a bright 7x7 block at a position that depends on k, over noise."""
    import numpy as np

    from dltrain.data.datasets import TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS
    from dltrain.data.idx import write_idx

    def split(n: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(split_seed)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, k in enumerate(labels):
            r, c = 3 + 8 * (int(k) // 4), 1 + 7 * (int(k) % 4)
            images[i, r:r + 7, c:c + 6] = rng.integers(180, 256, size=(7, 6), dtype=np.uint8)
        return images, labels

    path.mkdir(parents=True, exist_ok=True)
    (train_x, train_y), (test_x, test_y) = split(n_train, seed), split(n_test, seed + 1)
    for name, array in ((TRAIN_IMAGES, train_x), (TRAIN_LABELS, train_y),
                        (TEST_IMAGES, test_x), (TEST_LABELS, test_y)):
        write_idx(path / name, array)
    return path
