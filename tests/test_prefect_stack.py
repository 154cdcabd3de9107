"""The real local Prefect stack (infra/prefect/stack.py, what `make stack-up` runs): a server
and a process worker on loopback, deployments from prefect.yaml, and the pipeline run through
`prefect deployment run 'mnist-training/local'` on tiny data in a fresh clone.

One server for the whole module (start-up is ~20 s on a busy machine); it and the worker are
stopped in the fixture's teardown, pass or fail, and the teardown checks their pids are gone.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import make_clone, venv_env, write_raw_dir

RUN_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for its parent to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class LocalStack:
    clone: Path
    home: Path
    env: dict[str, str]
    api_url: str

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), cwd=self.clone, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def stack(self, command: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "infra/prefect/stack.py", command)

    def pids(self) -> list[int]:
        return [int(p.read_text()) for p in (self.home / "stack").glob("*.pid")]

    def api(self, path: str, body: dict) -> object:
        req = urllib.request.Request(f"{self.api_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory) -> LocalStack:
    root = tmp_path_factory.mktemp("stack")
    clone = make_clone(root / "clone")
    home = root / "prefect-home"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = venv_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_API_URL=api_url)
    stack = LocalStack(clone=clone, home=home, env=env, api_url=api_url)
    started: list[int] = []
    try:
        up = stack.stack("up")
        started = stack.pids()
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export PREFECT_API_URL={api_url}" in up.stdout
        yield stack
    finally:
        started = started or stack.pids()
        down = stack.stack("down")
        assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert started and not any(_alive(p) for p in started), f"still running: {started}"
        assert not list((home / "stack").glob("*.pid"))


def _run_deployment(stack: LocalStack, params: dict) -> subprocess.CompletedProcess[str]:
    return stack.run("prefect", "deployment", "run", "mnist-training/local",
                     "--params", json.dumps(params), "--watch",
                     "--watch-timeout", str(RUN_TIMEOUT_S), timeout=RUN_TIMEOUT_S + 60)


def _latest_summary(stack: LocalStack) -> str:
    artifacts = stack.api("/artifacts/filter", {
        "artifacts": {"key": {"any_": ["mnist-training-summary"]}},
        "sort": "CREATED_DESC", "limit": 1})
    return artifacts[0]["data"]


def _model_versions(clone: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlruns' / 'mlflow.db'}")
    return sorted(str(v.version) for v in client.search_model_versions("name = 'mnist-mlp'"))


@pytest.mark.e2e
def test_stack_up_twice_says_already_up(local_stack):
    again = local_stack.stack("up")
    assert again.returncode == 0
    assert "already up" in again.stdout
    status = local_stack.stack("status")
    assert "healthy" in status.stdout and "online" in status.stdout


@pytest.mark.e2e
def test_deploy_and_run_the_pipeline_then_rerun_skips(local_stack, tmp_path):
    deploy = local_stack.run("bash", "infra/prefect/deploy.sh")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "mnist-training/local" in deploy.stdout
    assert "mnist-training/scheduled-retraining" in deploy.stdout
    again = local_stack.run("bash", "infra/prefect/deploy.sh")  # idempotent
    assert again.returncode == 0 and "work pool dltrain-local: exists" in again.stdout

    source = write_raw_dir(tmp_path / "source")
    params = {"epochs": 1, "num_workers": 1, "overrides": {"data.source": source.as_uri()}}
    first = _run_deployment(local_stack, params)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Completed" in first.stdout
    summary = _latest_summary(local_stack)
    for stage in ("download", "preprocess", "train", "evaluate", "register"):
        assert f"| {stage} | ran |" in summary
    versions = _model_versions(local_stack.clone)
    assert versions == ["1"]
    registration = (local_stack.clone / "reports" / "registration.json").read_text()
    assert str(json.loads(registration)["version"]) == "1"
    lock = (local_stack.clone / "dvc.lock").read_text()

    second = _run_deployment(local_stack, params)
    assert second.returncode == 0, second.stdout + second.stderr
    summary = _latest_summary(local_stack)
    for stage in ("download", "preprocess", "train", "evaluate", "register"):
        assert f"| {stage} | skipped |" in summary
    assert _model_versions(local_stack.clone) == versions  # nothing new registered
    assert (local_stack.clone / "reports" / "registration.json").read_text() == registration
    assert (local_stack.clone / "dvc.lock").read_text() == lock


def test_stack_down_leaves_a_reused_pid_alone(tmp_path):
    """A stale pid file whose pid now belongs to another program: `down` must not kill it."""
    home = tmp_path / "home"
    (home / "stack").mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (home / "stack" / "server.pid").write_text(f"{bystander.pid}\n")
        down = subprocess.run([sys.executable, "infra/prefect/stack.py", "down"],
                              cwd=Path(__file__).resolve().parent.parent,
                              env=venv_env(PREFECT_HOME=str(home)), capture_output=True,
                              text=True, timeout=60)
        assert down.returncode == 0
        assert "not running" in down.stdout
        assert bystander.poll() is None
        assert not (home / "stack" / "server.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()
