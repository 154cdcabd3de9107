"""The architecture as checked contracts, run as `make lint` runs them: import-linter's contracts
in pyproject.toml (the role packages' layers, flows/ reaching dltrain only through its CLI and
core, no import cycles) and deptry (every third-party import a declared dependency).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The venv's console scripts, beside the interpreter running the tests.
BIN = Path(sys.executable).parent


def run_tool(name: str, *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    # NO_COLOR: plain text in the failure message.
    return subprocess.run([str(BIN / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": f"{BIN}:/usr/bin:/bin", "NO_COLOR": "1"})


def test_import_contracts_are_kept() -> None:
    result = run_tool("lint-imports", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_third_party_import_is_a_declared_dependency() -> None:
    result = run_tool("deptry", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_under_type_checking_breaks_the_layers(tmp_path: Path) -> None:
    """The contracts count imports a type checker alone follows: tracking importing the
    registry for an annotation is the layering broken, and a cycle."""
    for name in ("dltrain", "flows"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path)
    store = tmp_path / "dltrain" / "tracking" / "store.py"
    store.write_text(store.read_text() + "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:"
                     "\n    from dltrain.registry.register import read_candidate\n")
    result = run_tool("lint-imports", "--no-cache", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "dltrain.tracking is not allowed to import dltrain.registry" in out, out
    assert "dltrain.tracking.store -> dltrain.registry.register" in out, out
    assert "No cycles are allowed in dltrain." in out, out
