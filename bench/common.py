"""Helpers shared by the benchmarks: a scratch workspace, running `dltrain`, the machine."""

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
