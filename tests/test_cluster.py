"""The train stage on a real multi-node Ray cluster, started with the same script as
`make cluster-up` (infra/local-cluster/cluster.py): a head and one worker node, 1 CPU each.

One cluster serves the module (each start costs ~25 s on a busy 2-core machine); each test
first makes sure both nodes are up (`up` is idempotent and replaces a missing worker node).
The cluster is stopped in the fixture's teardown, pass or fail, and the teardown asserts that
none of its processes is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO_ROOT, make_processed, venv_env

CLUSTER_SCRIPT = REPO_ROOT / "infra" / "local-cluster" / "cluster.py"
pytestmark = pytest.mark.integration


class LocalCluster:
    """Drives cluster.py on one state dir; remembers every node process group it ever saw."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.pgids: set[int] = set()

    def run(self, *args: str, timeout: float = 240) -> str:
        out = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "--state-dir",
                              str(self.state_dir), *args], capture_output=True, text=True,
                             timeout=timeout, env=venv_env())
        self.state()  # record the process groups of any node just started
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    def state(self) -> dict:
        path = self.state_dir / "cluster.json"
        if not path.is_file():
            return {"nodes": []}
        data = json.loads(path.read_text())
        self.pgids.update(n["pgid"] for n in data["nodes"])
        return data

    def node_ids(self) -> dict[str, str]:
        return {n["name"]: n["node_id"] for n in self.state()["nodes"]}

    def ensure_two_nodes(self) -> None:
        self.run("up", "--workers", "1", "--head-cpus", "1", "--worker-cpus", "1",
                 "--no-dashboard")
        assert len(self.node_ids()) == 2

    def client_env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.state()["address"], "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.state_dir / "auth_token")}

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes of this cluster still alive: in a node's process group, or carrying the
        cluster's token path in their environment (every Ray process inherits it)."""
        token = str(self.state_dir / "auth_token")
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if os.getpgid(proc.pid) in self.pgids or \
                        proc.environ().get("RAY_AUTH_TOKEN_PATH") == token:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                continue
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    local = LocalCluster(tmp_path_factory.mktemp("cluster") / "state")
    try:
        local.ensure_two_nodes()
        yield local
    finally:
        local.run("down")
        deadline = time.monotonic() + 15
        while local.leftover_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = local.leftover_processes()
        assert not left, f"cluster processes left after `down`: {[p.pid for p in left]}"
        assert not (local.state_dir / "auth_token").exists()


def _workspace(root: Path, n_train: int, epochs: int, max_failures: int, storage: Path) -> Path:
    ws = make_processed(root, n_train=n_train, n_test=200)
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [256]},
        "train": {"epochs": epochs, "batch_size": 32, "num_workers": 2,
                  "max_failures": max_failures, "placement_strategy": "STRICT_SPREAD",
                  "storage_path": str(storage)}}))
    return ws


def _train(ws: Path, cluster: LocalCluster) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)],
                            env=venv_env(**cluster.client_env()), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, storage: Path, epoch: int) -> None:
    deadline = time.monotonic() + 300
    while not list(storage.glob(f"*/epoch_{epoch:04d}")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch} within 300 s"
        time.sleep(0.2)


def test_two_workers_spread_over_two_nodes_checkpoint_to_shared_storage(
        cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.ensure_two_nodes()
    storage = tmp_path / "shared"
    ws = _workspace(tmp_path, n_train=1200, epochs=2, max_failures=0, storage=storage)
    proc = _train(ws, cluster)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output

    report = json.loads((ws / "reports" / "training.json").read_text())
    assert report["world_size"] == 2
    # STRICT_SPREAD: one worker on each node, so both of the cluster's node IDs took part.
    assert sorted(report["nodes"]) == sorted(cluster.node_ids().values())
    assert len(set(report["nodes"])) == 2
    assert report["epochs"][-1]["val_accuracy"] >= 0.9
    run_dir = storage / report["run_name"]
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0001", "epoch_0002"]
    assert (run_dir / "epoch_0002" / "state.pt").is_file()
    assert not (ws / ".ray_results").exists()  # nothing went to the default local path


def test_worker_node_killed_without_retries_fails_clearly(cluster: LocalCluster,
                                                          tmp_path: Path) -> None:
    cluster.ensure_two_nodes()
    storage = tmp_path / "shared"
    ws = _workspace(tmp_path, n_train=12000, epochs=8, max_failures=0, storage=storage)
    proc = _train(ws, cluster)
    try:
        _wait_for_checkpoint(proc, storage, 1)
        cluster.run("kill-node", next(n for n in cluster.node_ids() if n != "head"))
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "training failed after 0 allowed worker failure(s) (train.max_failures)" in output
    assert not (ws / "models" / "model.pt").exists()


def test_worker_node_killed_then_replaced_resumes_from_checkpoint(cluster: LocalCluster,
                                                                 tmp_path: Path) -> None:
    cluster.ensure_two_nodes()
    storage = tmp_path / "shared"
    ws = _workspace(tmp_path, n_train=12000, epochs=6, max_failures=2, storage=storage)
    proc = _train(ws, cluster)
    try:
        _wait_for_checkpoint(proc, storage, 2)
        victim = next(n for n in cluster.node_ids() if n != "head")
        killed_id = cluster.node_ids()[victim]
        cluster.run("kill-node", victim)
        replacement = cluster.run("add-node", "--cpus", "1").split()
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    report = json.loads((ws / "reports" / "training.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, 7))
    attempts = [e["attempt"] for e in report["epochs"]]
    assert attempts[:2] == [0, 0] and attempts[-1] >= 1 and attempts == sorted(attempts)
    assert "resuming from the checkpoint of epoch" in output
    # The last attempt ran on the head and the replacement node, not on the killed one.
    assert killed_id not in report["nodes"]
    assert replacement[1] in report["nodes"] and len(set(report["nodes"])) == 2
    assert report["epochs"][-1]["val_accuracy"] >= 0.9
