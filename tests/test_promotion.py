"""Promotion under concurrency and faults, on the real MLflow: concurrent `dltrain register`
runs against one SQLite store, and a real `mlflow server` behind a fault-injecting proxy (an
HTTP error on one registry call, an alias write held back while another registration runs).

Each test reproduces a way promotion went wrong (a worse model left champion, a version left
without its alias, a lost history entry) and asserts the end state the gate decides."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dltrain.cli import main
from dltrain.config import params_from_dict
from dltrain.errors import RegistryError
from dltrain.paths import Workspace
from dltrain.registry.register import register

from helpers.mlflow import FaultProxy, fail, free_port, serve_mlflow
from helpers.models import evaluated_workspace, replace_weights
from helpers.repo import venv_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return evaluated_workspace(tmp_path_factory.mktemp("evaluated"))


def _copy(evaluated: Workspace, dst: Path) -> Workspace:
    shutil.copytree(evaluated.root, dst)
    return Workspace.at(dst)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _state(uri: str, name: str) -> tuple[dict[str, int], dict[str, int]]:
    """({alias: version}, {weights_sha256: version}) of registered model `name`."""
    client = _client(uri)
    aliases = {k: int(v) for k, v in client.get_registered_model(name).aliases.items()}
    versions = {v.tags["weights_sha256"]: int(v.version)
                for v in client.search_model_versions(f"name = '{name}'")}
    return aliases, versions


def _history(ws: Workspace, uri: str, name: str, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["registry", "history", "--json", "--workspace", str(ws.root), "-S",
                 f"register.tracking_uri={uri}", "-S", f"register.model_name={name}"]) == 0
    return json.loads(capsys.readouterr().out)


def _replayed(entries: list[dict]) -> dict[str, int]:
    """The aliases that the history's moves, applied in order, end with."""
    state: dict[str, int] = {}
    for entry in entries:
        if entry["to_version"] is None:
            state.pop(entry["alias"], None)
        else:
            state[entry["alias"]] = entry["to_version"]
    return state


def _register_all_at_once(workspaces: list[Workspace], uri: str, cwd: Path
                          ) -> list[subprocess.CompletedProcess]:
    """`dltrain register` in every workspace, all started together, against store `uri`."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "dltrain", "register", "--workspace", str(ws.root),
         "-S", f"register.tracking_uri={uri}", "-S", "register.min_accuracy=0.5"],
        cwd=cwd, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for ws in workspaces]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate())
            for p in procs]


def _sqlite_store(tmp_path: Path, existing: bool) -> str:
    """An SQLite store URI; `existing`: its database and experiment made beforehand (the
    usual case, where registrations race on the versions and aliases), else made by the
    racing runs."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    if existing:
        (tmp_path / "store").mkdir()
        _client(uri).create_experiment(
            "mnist-training", artifact_location=(tmp_path / "store" / "artifacts").as_uri())
    return uri


@pytest.mark.parametrize("existing", [True, False], ids=["existing-store", "new-store"])
def test_two_registers_at_once_leave_the_better_model_champion(
        evaluated: Workspace, tmp_path: Path, capsys, existing: bool) -> None:
    """0.801 and 0.757, registered at once into one SQLite store: the 0.801 model is champion,
    the 0.757 one challenger (in either order), and every move of both runs is in the
    history."""
    uri = _sqlite_store(tmp_path, existing)
    good, bad = _copy(evaluated, tmp_path / "good"), _copy(evaluated, tmp_path / "bad")
    good_sha = replace_weights(good, seed=1, accuracy=0.801)
    bad_sha = replace_weights(bad, seed=2, accuracy=0.757)

    for done in _register_all_at_once([good, bad], uri, tmp_path):
        assert done.returncode == 0, done.stderr
    aliases, versions = _state(uri, "mnist-mlp")
    assert set(versions) == {good_sha, bad_sha}
    assert aliases == {"champion": versions[good_sha], "challenger": versions[bad_sha]}

    entries = _history(good, uri, "mnist-mlp", capsys)
    assert _replayed(entries) == aliases
    for ws in (good, bad):  # each run's own moves are all in the registry's history
        own = json.loads(ws.registration_path.read_text())["history"]
        assert own and all(entry in entries for entry in own)


def test_identical_weights_registered_three_times_at_once_make_one_version(
        evaluated: Workspace, tmp_path: Path, capsys) -> None:
    uri = _sqlite_store(tmp_path, existing=True)
    copies = [_copy(evaluated, tmp_path / f"ws{i}") for i in range(3)]
    for done in _register_all_at_once(copies, uri, tmp_path):
        assert done.returncode == 0, done.stderr
    versions = _client(uri).search_model_versions("name = 'mnist-mlp'")
    assert [int(v.version) for v in versions] == [1]
    assert _state(uri, "mnist-mlp")[0] == {"champion": 1}
    outcomes = [json.loads(ws.registration_path.read_text()) for ws in copies]
    assert [o["version"] for o in outcomes] == [1, 1, 1]
    assert sorted(o["new_version"] for o in outcomes) == [False, False, True]
    assert [(e["alias"], e["to_version"]) for e in _history(copies[0], uri, "mnist-mlp",
                                                           capsys)] == [("champion", 1)]


# ------------------------------------------------------------------- a real server and a proxy

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_mlflow(free_port(), tmp_path_factory.mktemp("server")) as uri:
        yield uri


@pytest.fixture
def proxy(server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    # No client-side retries of the injected errors: each test sees its fault at once.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with FaultProxy(server) as p:
        yield p


@pytest.fixture
def ws(evaluated: Workspace, tmp_path: Path) -> Workspace:
    return _copy(evaluated, tmp_path / "ws")


def _params(proxy: FaultProxy, name: str):
    return params_from_dict({"register": {"min_accuracy": 0.5, "tracking_uri": proxy.uri,
                                          "model_name": name}})


def _runs(uri: str) -> int:
    client = _client(uri)
    return len(client.search_runs([client.get_experiment_by_name("mnist-training")
                                   .experiment_id]))


def test_a_503_on_the_alias_lookup_never_crowns_a_worse_model(ws: Workspace, proxy: FaultProxy,
                                                               server: str) -> None:
    name = "alias-503"
    replace_weights(ws, seed=1, accuracy=0.90)
    assert register(ws, _params(proxy, name))["aliases"] == ["champion"]
    replace_weights(ws, seed=2, accuracy=0.80)
    proxy.rules.append(fail("GET", "/registered-models/alias", 503))
    outcome = register(ws, _params(proxy, name))
    assert outcome["aliases"] == ["challenger"] and outcome["champion_accuracy"] == 0.90
    assert _state(server, name)[0] == {"champion": 1, "challenger": 2}


def test_a_503_reading_the_registry_fails_the_stage_and_changes_nothing(
        ws: Workspace, proxy: FaultProxy, server: str, capsys) -> None:
    """Only "does not exist" means "no champion yet": any other error stops the stage before
    it logs a run or registers anything."""
    name = "get-503"
    replace_weights(ws, seed=1, accuracy=0.90)
    register(ws, _params(proxy, name))
    ws.registration_path.unlink()
    runs = _runs(server)
    replace_weights(ws, seed=2, accuracy=0.80)
    proxy.rules.append(fail("GET", "/registered-models/get", 503))
    code = main(["register", "--workspace", str(ws.root), "-S", "register.min_accuracy=0.5",
                 "-S", f"register.tracking_uri={proxy.uri}", "-S", f"register.model_name={name}"])
    err = capsys.readouterr().err
    assert code == 1 and "failed during registration" in err and "503" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _state(server, name)[0] == {"champion": 1}
    assert len(_state(server, name)[1]) == 1 and _runs(server) == runs
    assert not ws.registration_path.exists()


def test_a_rerun_after_a_failure_between_version_and_alias_finishes_the_promotion(
        ws: Workspace, proxy: FaultProxy, server: str, capsys) -> None:
    name = "alias-write-fails"
    replace_weights(ws, seed=1, accuracy=0.80)
    register(ws, _params(proxy, name))
    better = replace_weights(ws, seed=2, accuracy=0.90)
    proxy.rules.append(fail("POST", "/registered-models/alias", 500))
    with pytest.raises(RegistryError, match="500"):
        register(ws, _params(proxy, name))
    aliases, versions = _state(server, name)
    assert versions[better] == 2 and aliases == {"champion": 1}  # created, not promoted

    proxy.rules.clear()
    again = register(ws, _params(proxy, name))
    assert (again["version"], again["new_version"], again["aliases"]) == (2, False, ["champion"])
    assert _state(server, name)[0] == {"champion": 2, "challenger": 1}
    entries = _history(ws, proxy.uri, name, capsys)
    assert [(e["alias"], e["from_version"], e["to_version"]) for e in entries] == [
        ("champion", None, 1), ("champion", 1, 2), ("challenger", None, 1)]


def test_a_stale_alias_write_of_a_racing_registration_is_reconciled(
        evaluated: Workspace, tmp_path: Path, proxy: FaultProxy, server: str, capsys) -> None:
    """Against a server there is no lock: registration A (0.757) creates version 1, and its
    write of `champion` is held back while registration B (0.801) runs start to end. A's write
    then lands on top of B's; A sees version 2 and settles the aliases again, so the end state
    is the gate's: 0.801 champion, 0.757 challenger."""
    name = "race"
    a, b = _copy(evaluated, tmp_path / "a"), _copy(evaluated, tmp_path / "b")
    replace_weights(a, seed=1, accuracy=0.757)
    replace_weights(b, seed=2, accuracy=0.801)
    release, held = threading.Event(), threading.Event()

    def hold_a(method: str, path: str, body: dict | None) -> threading.Event | None:
        if (method == "POST" and path.endswith("/registered-models/alias") and body
                and body.get("name") == name and str(body.get("version")) == "1"
                and not held.is_set()):
            held.set()
            return release
        return None

    proxy.rules.append(hold_a)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        a=register(a, _params(proxy, name))))
    thread.start()
    try:
        assert held.wait(timeout=120), "registration A never wrote its alias"
        outcome_b = register(b, _params(proxy, name))
        assert (outcome_b["version"], outcome_b["aliases"]) == (2, ["champion"])
    finally:
        release.set()
        thread.join(timeout=120)
    assert _state(server, name)[0] == {"champion": 2, "challenger": 1}
    assert result["a"]["aliases"] == ["challenger"]
    entries = _history(a, proxy.uri, name, capsys)
    assert _replayed(entries) == {"champion": 2, "challenger": 1}
    assert entries[-1]["action"] == "reconcile"
