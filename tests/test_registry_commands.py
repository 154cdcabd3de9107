"""`dltrain registry history` and `dltrain registry rollback` on the real embedded MLflow store:
the history of every alias move, a rollback that `dltrain predict` follows at once, and the
rollbacks that are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dltrain.cli import main
from dltrain.model.weights import load_weights
from dltrain.paths import Workspace
from dltrain.registry.history import HISTORY_PREFIX
from dltrain.registry.predict import predict
from dltrain.tracking.store import embedded_tracking_uri

from helpers.models import evaluated_workspace, plant_model, write_params

pytestmark = pytest.mark.integration


def _run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _register_three(root: Path) -> tuple[Workspace, dict[int, bytes]]:
    """Version 1 (trained), 2 (trained longer from another seed: champion), 3 (untrained:
    challenger), registered in the workspace's embedded store; with each version's weights."""
    ws = evaluated_workspace(root)
    weights = {}
    for version, (seed, epochs) in enumerate([(None, None), (6, 4), (5, 0)], start=1):
        if seed is not None:
            plant_model(ws, seed=seed, epochs=epochs)
        weights[version] = ws.model_path.read_bytes()
        assert main(["register", "--workspace", str(ws.root), "-S",
                     "register.min_accuracy=0"]) == 0
    return ws, weights


@pytest.fixture
def three_versions(tmp_path: Path) -> tuple[Workspace, dict[int, bytes]]:
    return _register_three(tmp_path / "ws")


@pytest.fixture(scope="module")
def three_versions_shared(tmp_path_factory: pytest.TempPathFactory
                          ) -> tuple[Workspace, dict[int, bytes]]:
    """For tests that must change nothing (each checks that it did not)."""
    return _register_three(tmp_path_factory.mktemp("shared") / "ws")


def _history(ws: Workspace, capsys) -> list[dict]:
    code, out, _ = _run(capsys, "registry", "history", "--json", "--workspace", str(ws.root))
    assert code == 0
    return json.loads(out)


def _aliases(ws) -> dict[str, int]:
    from mlflow import MlflowClient

    model = MlflowClient(embedded_tracking_uri(ws.root)).get_registered_model("mnist-mlp")
    return {alias: int(version) for alias, version in model.aliases.items()}


def _champion(ws: Workspace) -> int:
    from mlflow import MlflowClient

    uri = embedded_tracking_uri(ws.root)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return int(client.get_registered_model("mnist-mlp").aliases["champion"])


def test_history_then_rollback_that_predict_follows(three_versions, tmp_path: Path,
                                                    capsys) -> None:
    ws, weights = three_versions
    entries = _history(ws, capsys)
    assert [(e["alias"], e["from_version"], e["to_version"], e["action"]) for e in entries] == [
        ("champion", None, 1, "register"), ("champion", 1, 2, "register"),
        ("challenger", None, 1, "register"), ("challenger", 1, 3, "register")]
    summary = json.loads((ws.processed_dir / "summary.json").read_text())
    for entry in entries:
        assert entry["test_sha256"] == summary["test"]["sha256"]
        assert entry["data_checksum"] == summary["data_checksum"]
        assert entry["git_commit"] == "0123456789abcdef" and entry["time"].endswith("Z")
    assert "does not beat champion version 2" in entries[3]["reason"]
    assert entries[3]["champion_accuracy"] == entries[1]["candidate_accuracy"]

    code, table, _ = _run(capsys, "registry", "history", "--workspace", str(ws.root))
    assert code == 0 and len(table.splitlines()) == 5
    assert table.splitlines()[2].split()[1:5] == ["champion", "1", "->", "2"]

    # Predictions of the champion, before and after the rollback, against each version's own.
    image = np.load(ws.processed_dir / "test_images.npy")[:8]
    pngs = []
    for i, pixels in enumerate(image):
        pngs.append(str(ws.root / f"{i}.png"))
        Image.fromarray(pixels, mode="L").save(pngs[-1])

    def champion_predicts() -> list[float]:
        code, out, err = _run(capsys, "predict", "--model", "models:/mnist-mlp@champion",
                              "--tracking-uri", embedded_tracking_uri(ws.root), "--json", *pngs)
        assert code == 0, err
        return [r["probability"] for r in json.loads(out)]

    def own(version: int) -> list[float]:
        path = tmp_path / f"v{version}" / "model.safetensors"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(weights[version])
        (path.parent / "model.json").write_text(json.dumps({
            **json.loads(ws.model_card_path.read_text()),
            "weights_sha256": hashlib.sha256(weights[version]).hexdigest()}))
        state, _ = load_weights(path)
        return [round(float(p), 6) for p in predict(state, image)[1]]

    assert champion_predicts() == own(2) != own(1)
    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root),
                          "--reason", "version 2 misclassifies sandals in production")
    assert code == 0, err
    assert "champion 2 -> 1 (rollback)" in out
    assert _champion(ws) == 1
    assert champion_predicts() == own(1)  # at once: predict resolves the alias on each call
    last = _history(ws, capsys)[-1]
    assert (last["alias"], last["from_version"], last["to_version"], last["action"]) == (
        "champion", 2, 1, "rollback")
    assert last["reason"] == "version 2 misclassifies sandals in production"

    # A plain rollback undoes the last one: back to the champion version 1 replaced.
    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root))
    assert code == 0, err
    assert "champion 1 -> 2 (rollback)" in out and _champion(ws) == 2
    # So does it after a rollback to a named version.
    assert _run(capsys, "registry", "rollback", "--workspace", str(ws.root), "--to", "1")[0] == 0
    assert _champion(ws) == 1
    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root))
    assert code == 0, err
    assert "champion 1 -> 2 (rollback)" in out and _champion(ws) == 2
    moves = [(e["alias"], e["from_version"], e["to_version"], e["action"])
             for e in _history(ws, capsys)[-4:]]
    assert moves == [("champion", 2, 1, "rollback"), ("champion", 1, 2, "rollback")] * 2

    # Back to the challenger (the state a registration leaves when it displaces a champion):
    # the champion it replaces becomes the challenger, recorded too; no version is left
    # holding both aliases.
    from mlflow import MlflowClient

    MlflowClient(embedded_tracking_uri(ws.root)).set_registered_model_alias(
        "mnist-mlp", "challenger", "1")
    code, _, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root), "--to", "1")
    assert code == 0, err
    assert _aliases(ws) == {"champion": 1, "challenger": 2}
    last = _history(ws, capsys)[-1]
    assert (last["alias"], last["from_version"], last["to_version"], last["action"]) == (
        "challenger", 1, 2, "rollback")

    # A champion set outside dltrain has no recorded predecessor: the default names the fix.
    MlflowClient(embedded_tracking_uri(ws.root)).set_registered_model_alias(
        "mnist-mlp", "champion", "3")
    code, _, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root))
    assert code == 1 and "records no champion before version 3" in err and "--to VERSION" in err


def test_the_history_is_kept_on_the_versions_and_an_older_registrys_is_read_too(
        three_versions, capsys) -> None:
    """The registered model's own tags hold no history (the MLflow UI shows them above the
    versions table); each move is a tag of the version it concerns. A registry written before,
    whose moves are registered-model tags, reads the same, and its rollback works."""
    from mlflow import MlflowClient

    ws, _ = three_versions
    uri = embedded_tracking_uri(ws.root)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    before = _history(ws, capsys)
    assert len(before) == 4
    model = client.get_registered_model("mnist-mlp")
    assert not [k for k in model.tags if k.startswith(HISTORY_PREFIX)], model.tags
    assert len(model.tags) <= 2, model.tags  # the gate's anchor, not a wall of entries
    held = {}
    for version in (1, 2, 3):
        tags = client.get_model_version("mnist-mlp", str(version)).tags
        held[version] = {k: v for k, v in tags.items() if k.startswith(HISTORY_PREFIX)}
    moves = {v: sorted((json.loads(e)["alias"], json.loads(e)["from_version"])
                       for e in tags.values()) for v, tags in held.items()}
    assert moves == {1: [("challenger", None), ("champion", None)], 2: [("champion", 1)],
                     3: [("challenger", 1)]}

    # As an older dltrain wrote it: every entry a registered-model tag, none on the versions.
    for version, tags in held.items():
        for key, value in tags.items():
            client.set_registered_model_tag("mnist-mlp", key, value)
            client.delete_model_version_tag("mnist-mlp", str(version), key)
    assert _history(ws, capsys) == before
    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root))
    assert code == 0 and "champion 2 -> 1 (rollback)" in out, err
    after = _history(ws, capsys)
    assert after[:4] == before and (after[4]["from_version"], after[4]["to_version"]) == (2, 1)
    assert [k for k in client.get_model_version("mnist-mlp", "1").tags
            if k.startswith(HISTORY_PREFIX)]  # the new move went on the version


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "9"], "mnist-mlp has no version 9"),
    (["--to", "2"], "version 2 of mnist-mlp is already the champion"),
    # Version 3 was registered with min_accuracy 0: the pipeline's default 0.8 refuses it.
    (["--to", "3", "-S", "register.min_accuracy=0.8"], "below register.min_accuracy 0.8"),
    (["--to", "1", "-S", "data.dataset=mnist"], "was trained on fashion-mnist, but the "
                                                 "pipeline's data set is mnist"),
])
def test_refused_rollbacks_change_nothing(three_versions_shared, capsys, args: list[str],
                                          message: str) -> None:
    ws, _ = three_versions_shared
    before = _history(ws, capsys)
    code, out, err = _run(capsys, "registry", "rollback", "--workspace", str(ws.root), *args)
    assert code == 1 and message in err
    assert err.startswith("dltrain registry: error: ") and len(err.strip().splitlines()) == 1
    assert _champion(ws) == 2 and _history(ws, capsys) == before


def test_history_without_a_registry_is_one_clear_line(tmp_path: Path, capsys) -> None:
    write_params(tmp_path)
    code, _, err = _run(capsys, "registry", "history", "--workspace", str(tmp_path))
    assert code == 1 and "no MLflow registry at" in err and "dltrain register" in err
