"""An existing MLflow store that cannot be used is an error, never a new registry: a 0-byte,
garbage or damaged mlruns/mlflow.db gives one line naming the file (no SQLAlchemy traceback) from
register, predict --model models:/... and `dltrain registry ...`, and the file is left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dltrain.cli import main
from dltrain.paths import Workspace

from helpers.models import evaluated_workspace

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = evaluated_workspace(tmp_path_factory.mktemp("store") / "ws")
    assert main(["register", "--workspace", str(ws.root), "-S", "register.min_accuracy=0"]) == 0
    return ws


def _damage(db: Path, kind: str) -> None:
    if kind == "empty":
        db.write_bytes(b"")
    elif kind == "garbage":
        db.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    else:  # a real store whose pages after the header were overwritten
        data = bytearray(db.read_bytes())
        data[100:] = b"\x55" * (len(data) - 100)
        db.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["empty", "garbage", "damaged pages"])
def test_an_unusable_store_is_one_line_naming_it_from_every_command(
        registered: Workspace, tmp_path: Path, capsys, kind: str) -> None:
    root = tmp_path / "ws"
    shutil.copytree(registered.root, root, symlinks=True)
    db = root / "mlruns" / "mlflow.db"
    _damage(db, kind)
    before = db.read_bytes()
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    commands = {
        "register": ["register", "--workspace", str(root), "-S", "register.min_accuracy=0"],
        "predict": ["predict", "--tracking-uri", f"sqlite:///{db}", "--model",
                    "models:/mnist-mlp@champion", str(image)],
        "history": ["registry", "history", "--workspace", str(root)],
        "rollback": ["registry", "rollback", "--workspace", str(root), "--to", "1"],
    }
    for command, argv in commands.items():
        capsys.readouterr()
        assert main(argv) != 0, command
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and "sqlalchemy" not in err.lower(), (command, err)
        assert len(err.splitlines()) == 1, (command, err)
        assert str(db) in err and ("empty (0 bytes)" in err if kind == "empty"
                                   else "corrupt" in err or "not an MLflow store" in err), err
        assert db.read_bytes() == before, command  # never made into a fresh registry
    assert not (root / "reports" / "registration.json").exists() or (
        (root / "reports" / "registration.json").read_bytes()
        == (registered.root / "reports" / "registration.json").read_bytes())
