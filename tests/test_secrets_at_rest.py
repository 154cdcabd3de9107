"""No password at rest, end to end: a password planted by each route that can carry one is
refused (params.yaml, a -S override) or used without being written anywhere (MLFLOW_TRACKING_URI
in the environment, to a real `mlflow server` on loopback, which ignores the login), and a grep
for it over the workspace (dvc.lock, models/, reports/, .dvc/cache, Ray's run directory), the
MLflow server's store and the Prefect API's logs, artifacts and flow runs finds nothing."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from dltrain.cli import main
from flows import mnist_training as mt

from helpers.mlflow import free_port, serve_mlflow

pytestmark = pytest.mark.integration


def _files_holding(root: Path, secret: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if secret in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def _prefect_texts(flow_run_id=None) -> list[str]:
    """Everything the Prefect API keeps of the runs (of flow run `flow_run_id` only, if given:
    the server is the session's, shared with other tests): every log line, every artifact,
    every flow run's parameters and state message."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    def every(read, **only) -> list:  # the API answers a page at a time
        items, page = [], 100
        while True:
            got = read(limit=page, offset=len(items), **only)
            items += got
            if len(got) < page:
                return items

    ids = [flow_run_id]
    one = flow_run_id is not None
    with get_client(sync_client=True) as client:
        logs = every(client.read_logs, **(
            {"log_filter": LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids))} if one else {}))
        artifacts = every(client.read_artifacts, **(
            {"artifact_filter": ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids))}
            if one else {}))
        runs = every(client.read_flow_runs, **(
            {"flow_run_filter": FlowRunFilter(id=FlowRunFilterId(any_=ids))} if one else {}))
    texts = [log.message for log in logs]
    texts += [f"{a.key} {a.description} {a.data}" for a in artifacts]
    texts += [f"{r.parameters} {r.state.message if r.state else ''}" for r in runs]
    return texts


def test_a_planted_password_is_nowhere_at_rest(prefect_harness, fresh_clone: Path,
                                               tiny_source: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys) -> None:
    planted = f"pw-{secrets.token_hex(8)}"
    port = free_port()
    params_yaml = fresh_clone / "params.yaml"
    original = params_yaml.read_text()

    # 1. params.yaml: refused before any stage, the message showing alice:***@.
    params_yaml.write_text(original.replace(
        "tracking_uri: null", f"tracking_uri: http://alice:{planted}@127.0.0.1:{port}", 1))
    assert planted in params_yaml.read_text()
    assert main(["check", "--workspace", str(fresh_clone)]) == 2
    err = capsys.readouterr().err
    assert "register.tracking_uri" in err and "alice:***@" in err and planted not in err
    params_yaml.write_text(original)

    # 3. a data source with a password, as a -S override: refused the same way.
    source = f"http://alice:{planted}@127.0.0.1:{port}/fashion"
    assert main(["check", "--workspace", str(fresh_clone), "-S", f"data.source={source}"]) == 2
    err = capsys.readouterr().err
    assert "data.source" in err and "alice:***@" in err and planted not in err

    # 2. MLFLOW_TRACKING_URI with user:password: legal (it reaches no file); the whole flow
    # runs against a real server that ignores the login, live tracking included.
    with serve_mlflow(port, tmp_path / "mlflow-store"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{planted}@127.0.0.1:{port}")
        state = mt.mnist_training(epochs=1, num_workers=0, workspace=str(fresh_clone),
                                  overrides={"data.source": tiny_source.as_uri()},
                                  return_state=True)
        assert state.is_completed(), state.message
        registration = (fresh_clone / "reports" / "registration.json").read_text()
        assert f"alice:***@127.0.0.1:{port}" in registration
        assert "champion" in registration

    secret = planted.encode()
    assert (fresh_clone / "dvc.lock").is_file() and (fresh_clone / ".dvc" / "cache").is_dir()
    assert _files_holding(fresh_clone, secret) == []  # workspace, dvc.lock, .dvc/cache, ...
    assert _files_holding(tmp_path / "mlflow-store", secret) == []  # runs, params, artifacts
    own = _prefect_texts(state.state_details.flow_run_id)
    assert any("params for this run" in t for t in own)  # the run's logs did arrive
    assert any("mnist-training-summary" in t for t in own)  # and its summary artifact
    assert [t for t in _prefect_texts() if planted in t] == []
    out = capsys.readouterr()
    assert planted not in out.out + out.err
