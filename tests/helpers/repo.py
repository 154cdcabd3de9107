"""The repository under test: its root, a fresh clone of the working tree, and the environment
its commands (dvc, dltrain) run in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_clone(clone: Path) -> Path:
    """A git clone of the working tree (uncommitted changes included), as a new user gets it:
    the tracked files plus the untracked, non-ignored ones."""
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
