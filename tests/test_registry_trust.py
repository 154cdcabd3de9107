"""The registry trusts only itself: rollback checks a version's files as predict does, the
registry's own weights_sha256 tag is the reference for every fetched model, a history tag that
another writer broke does not take the history down, a broken predict cache costs speed only,
and a moved or copied workspace never writes outside itself. Real MLflow on SQLite, real files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dltrain.cli import main
from dltrain.paths import Workspace
from dltrain.registry.history import HISTORY_PREFIX
from dltrain.tracking.store import embedded_tracking_uri

from helpers.data import new_test_split
from helpers.models import evaluated_workspace, plant_model

pytestmark = pytest.mark.integration

CHAMPION_REF = "models:/mnist-mlp@champion"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return evaluated_workspace(tmp_path_factory.mktemp("trust"))


def _register(ws: Workspace, *extra: str) -> int:
    return main(["register", "--workspace", str(ws.root), "-S", "register.min_accuracy=0",
                 *extra])


@pytest.fixture
def two_versions(tmp_path: Path, evaluated: Workspace) -> tuple[Workspace, dict[int, bytes]]:
    """Version 1 (challenger) and version 2 (champion: trained longer), with their weights."""
    shutil.copytree(evaluated.root, tmp_path / "ws")
    ws = Workspace.at(tmp_path / "ws")
    weights = {1: ws.model_path.read_bytes()}
    assert _register(ws) == 0
    plant_model(ws, seed=6, epochs=4)
    weights[2] = ws.model_path.read_bytes()
    assert _register(ws) == 0
    assert _aliases(ws) == {"champion": 2, "challenger": 1}
    return ws, weights


def _client(root: Path):
    from mlflow import MlflowClient

    uri = embedded_tracking_uri(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _aliases(ws: Workspace) -> dict[str, int]:
    model = _client(ws.root).get_registered_model("mnist-mlp")
    return {alias: int(version) for alias, version in model.aliases.items()}


def _files(ws: Workspace, version: int) -> Path:
    """The folder of a version's weights and card in the artifact store."""
    uri = _client(ws.root).get_model_version_download_uri("mnist-mlp", str(version))
    return Path(uri.removeprefix("file://")) / "artifacts"


def _run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _pngs(ws: Workspace, count: int = 4) -> tuple[list[str], np.ndarray]:
    images = np.load(ws.processed_dir / "test_images.npy")[:count]
    paths = []
    for i, pixels in enumerate(images):
        paths.append(str(ws.root / f"in{i}.png"))
        Image.fromarray(pixels, mode="L").save(paths[-1])
    return paths, images


def _plant(folder: Path, weights: bytes) -> None:
    """Replace a version's stored weights, and rewrite its stored card to match them: what
    someone who can write the artifact store (not the database) can do."""
    (folder / "model.safetensors").write_bytes(weights)
    card = json.loads((folder / "model.json").read_text())
    card["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    (folder / "model.json").write_text(json.dumps(card))


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ 4: rollback checks files

def _history_tags(ws: Workspace) -> dict[str, dict[str, str]]:
    """The registered model's tags and each version's: where the history is kept."""
    client = _client(ws.root)
    found = {"model": client.get_registered_model("mnist-mlp").tags}
    for version in client.search_model_versions("name = 'mnist-mlp'"):
        found[version.version] = version.tags
    return found


@pytest.mark.parametrize("damage", ["files deleted", "weights truncated"])
def test_rollback_refuses_a_version_whose_files_do_not_load(two_versions, capsys,
                                                             damage: str) -> None:
    ws, _ = two_versions
    folder = _files(ws, 1)
    if damage == "files deleted":
        shutil.rmtree(folder.parent)
        check = "download"
    else:
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
        check = "weights file"
    history_before = _history_tags(ws)

    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root),
                          "--to", "1")
    assert code == 1 and "rollback" not in out
    assert f"{check} check failed" in _one_line(err) and "version 1" in err
    assert _aliases(ws) == {"champion": 2, "challenger": 1}
    assert _history_tags(ws) == history_before


# ------------------------------------------------- 6: the registry's tag is the reference

def test_planted_weights_with_a_matching_card_are_refused_everywhere(two_versions, capsys
                                                                      ) -> None:
    """The champion's stored weights replaced by other valid weights (version 1's) and its
    stored card rewritten to match: predict, rollback to it, and the gate's re-score each
    compare with the weights_sha256 tag in the registry database, and refuse."""
    ws, weights = two_versions
    pngs, _ = _pngs(ws)
    _plant(_files(ws, 2), weights[1])

    code, out, err = _run(capsys, "predict", "--model", CHAMPION_REF, "--tracking-uri",
                          embedded_tracking_uri(ws.root), *pngs)
    assert code == 1 and out == ""
    assert "registry checksum check failed" in _one_line(err) and "version 2" in err

    # Rollback to a version planted the same way.
    _plant(_files(ws, 1), weights[2])
    code, _, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root),
                        "--to", "1")
    assert code == 1 and "registry checksum check failed" in _one_line(err)
    assert _aliases(ws)["champion"] == 2

    # The gate re-scores the champion on a new test set: the planted files are not scored.
    new_test_split(ws, seed=41)
    plant_model(ws, seed=5, epochs=0)
    code, _, err = _run(capsys, "register", "--workspace", str(ws.root), "-S",
                        "register.min_accuracy=0")
    assert code == 1 and "champion version 2 of mnist-mlp cannot be scored" in _one_line(err)
    assert "registry checksum check failed" in err
    assert _aliases(ws)["champion"] == 2


# ------------------------------------------------------------ 5: unreadable history tags

BAD_TAGS = {"not json": "not json {", "wrong keys": '{"alias": "champion"}',
            "a list": "[1,2]", "wrong types": json.dumps({
                "time": "2024-01-01T00:00:00.000Z", "alias": "champion", "from_version": "x",
                "to_version": 2, "action": "register", "reason": "r"})}


def test_unreadable_history_tags_are_named_and_the_rest_is_used(two_versions, capsys) -> None:
    ws, _ = two_versions
    client = _client(ws.root)
    keys = []
    for i, value in enumerate(BAD_TAGS.values()):
        keys.append(f"{HISTORY_PREFIX}{i + 1:019d}.0000000{i}")
        client.set_registered_model_tag("mnist-mlp", keys[-1], value)
    readable = 3  # champion None -> 1; then champion 1 -> 2 and challenger None -> 1

    code, out, err = _run(capsys, "registry", "history", "--json", "--workspace", str(ws.root))
    assert code == 0 and "Traceback" not in err
    entries = json.loads(out)
    assert len(entries) == readable
    assert all(e["alias"] in ("champion", "challenger") for e in entries)
    lines = err.splitlines()
    assert len(lines) == len(BAD_TAGS)
    for key, line in zip(keys, lines, strict=True):
        assert key in line and "unreadable" in line

    code, out, err = _run(capsys, "registry", "history", "--workspace", str(ws.root))
    assert code == 0 and len(out.splitlines()) == len(entries) + 1
    assert len(err.splitlines()) == len(BAD_TAGS) and "Traceback" not in err

    # Rollback decides from the readable entries: champion 2 was promoted over 1.
    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root))
    assert code == 0, err
    assert "champion 2 -> 1 (rollback)" in out and "Traceback" not in err
    assert _aliases(ws)["champion"] == 1


def test_rollback_refuses_in_one_line_when_only_unreadable_entries_could_decide(
        two_versions, capsys) -> None:
    ws, _ = two_versions
    client = _client(ws.root)
    for version in client.search_model_versions("name = 'mnist-mlp'"):
        for key in version.tags:
            if key.startswith(HISTORY_PREFIX):
                client.set_model_version_tag("mnist-mlp", version.version, key, "not json {")
    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root))
    assert code == 1 and "rollback" not in out
    assert "--to VERSION" in err.splitlines()[-1] and "Traceback" not in err
    assert "unreadable" in err.splitlines()[-1]
    assert _aliases(ws)["champion"] == 2


# ---------------------------------------------------------- 7: a broken cache costs speed

@pytest.mark.parametrize("breakage", ["cache is a file", "cache not writable"])
def test_a_broken_cache_falls_back_to_mlflow_and_says_so_once(two_versions, capsys,
                                                              breakage: str) -> None:
    from dltrain.registry.cache import cache_root

    ws, _ = two_versions
    pngs, _ = _pngs(ws)
    uri = embedded_tracking_uri(ws.root)
    code, expected, err = _run(capsys, "predict", "--model", CHAMPION_REF, "--tracking-uri",
                               uri, "--json", *pngs)
    assert code == 0, err
    root = cache_root(uri)
    shutil.rmtree(root)
    if breakage == "cache is a file":
        root.write_text("not a folder")
    else:
        # As root, permissions do not stop a write: a folder under a file does.
        root.mkdir()
        (root / "weights").write_text("not a folder")
        (root / "aliases").write_text("not a folder")
        os.chmod(root, 0o555)
    try:
        for _ in range(2):
            code, out, err = _run(capsys, "predict", "--model", CHAMPION_REF, "--tracking-uri",
                                  uri, "--json", *pngs)
            assert code == 0, err
            assert json.loads(out) == json.loads(expected)
            assert "cache" in _one_line(err) and str(root) in err
    finally:
        if root.is_dir():
            os.chmod(root, 0o755)


# ------------------------------------------------------------ 8: a workspace that moves

def _files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file()}


def test_a_moved_or_copied_workspace_never_writes_outside_itself(
        two_versions, tmp_path: Path, capsys, monkeypatch) -> None:
    """cp -a ws copy; mv ws ws.away: in the copy, predict and register stop in one line naming
    `dltrain registry relocate`, and nothing appears at the old place; after the relocation
    both work there. A plain copy beside its original never writes into the original's store."""
    import subprocess

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws, _ = two_versions
    images = np.load(ws.processed_dir / "test_images.npy")[:3]
    pngs = []
    for i, pixels in enumerate(images):
        pngs.append(str(tmp_path / f"in{i}.png"))
        Image.fromarray(pixels, mode="L").save(pngs[-1])
    copy, away = tmp_path / "copy", tmp_path / "ws.away"
    subprocess.run(["cp", "-a", str(ws.root), str(copy)], check=True)
    ws.root.rename(away)
    monkeypatch.chdir(copy)

    code, out, err = _run(capsys, "predict", "--model", CHAMPION_REF, *pngs)
    assert code == 1 and out == ""
    assert "moved or copied" in _one_line(err) and "dltrain registry relocate" in err
    plant_model(Workspace.at(copy), seed=7, epochs=4)
    code, _, err = _run(capsys, "register", "--workspace", str(copy), "-S",
                        "register.min_accuracy=0")
    assert code == 1 and "dltrain registry relocate" in _one_line(err)
    assert not ws.root.exists()

    code, out, err = _run(capsys, "registry", "relocate", "--workspace", str(copy))
    assert code == 0, err
    assert str(copy / "mlruns" / "artifacts") in out
    code, out, err = _run(capsys, "predict", "--model", CHAMPION_REF, "--json", *pngs)
    assert code == 0, err
    assert [r["class"] for r in json.loads(out)] == [
        int(k) for k in np.load(copy / "data" / "processed" / "test_labels.npy")[:3]]
    assert _run(capsys, "register", "--workspace", str(copy), "-S",
                "register.min_accuracy=0")[0] == 0
    assert not ws.root.exists()
    versions = _client(copy).search_model_versions("name = 'mnist-mlp'")
    assert len(versions) == 3
    for version in versions:
        assert version.source.startswith((copy / "mlruns" / "artifacts").as_uri() + "/")
    # A second relocation finds nothing to do.
    code, out, _ = _run(capsys, "registry", "relocate", "--workspace", str(copy))
    assert code == 0 and "nothing to relocate" in out

    # A plain copy beside its original (the original relocated in place first).
    assert _run(capsys, "registry", "relocate", "--workspace", str(away))[0] == 0
    original = _files_under(away / "mlruns")
    twin = tmp_path / "twin"
    subprocess.run(["cp", "-a", str(away), str(twin)], check=True)
    plant_model(Workspace.at(twin), seed=8, epochs=4)
    args = ["register", "--workspace", str(twin), "-S", "register.min_accuracy=0"]
    assert _run(capsys, *args)[0] == 1
    assert _run(capsys, "registry", "relocate", "--workspace", str(twin))[0] == 0
    assert _run(capsys, *args)[0] == 0
    assert _files_under(away / "mlruns") == original
