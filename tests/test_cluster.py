"""Real Ray clusters started by infra/local-cluster/cluster.py: the workspace's warm head of
`make ray-up` / `make ray-down`, and the train stage on a multi-node cluster as `make cluster-up`
starts it (a head and one worker node, 1 CPU each).

One multi-node cluster serves the module (each start costs ~25 s on a busy 2-core machine);
each test first makes sure both nodes are up (`up` is idempotent and replaces a missing worker
node). Every cluster is stopped in its fixture's teardown, pass or fail, and the teardown
asserts that none of its processes is left.
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

from helpers.data import make_processed
from helpers.repo import REPO_ROOT, venv_env

CLUSTER_SCRIPT = REPO_ROOT / "infra" / "local-cluster" / "cluster.py"
CLIENT_KEYS = ["RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"]
# A driver that connects to RAY_ADDRESS and prints the cluster's CPUs; exit 3 if it is refused.
CLIENT = """
import logging, os, sys
import ray
try:
    ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.ERROR,
             log_to_driver=False)
except ConnectionError as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(3)
print(int(ray.cluster_resources()["CPU"]))
"""
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


def assert_stopped(local: LocalCluster) -> None:
    """None of the cluster's processes is left (they may take a moment to exit), nor its
    token."""
    deadline = time.monotonic() + 15
    while local.leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = local.leftover_processes()
    assert not left, f"cluster processes left after `down`: {[p.pid for p in left]}"
    assert not (local.state_dir / "auth_token").exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    local = LocalCluster(tmp_path_factory.mktemp("cluster") / "state")
    try:
        local.ensure_two_nodes()
        yield local
    finally:
        local.run("down")
        assert_stopped(local)


@pytest.fixture
def warm_head_dir(tmp_path: Path):
    """DLTRAIN_RAY_DIR for `make ray-up`; whatever the test left running is stopped after it."""
    local = LocalCluster(tmp_path / ".ray")
    try:
        yield local
    finally:
        local.run("down")  # nothing left to stop once the test's own ray-down has run
        assert_stopped(local)


def _make(target: str, ray_dir: Path) -> subprocess.CompletedProcess:
    """`make TARGET` with this venv; -o: the venv is set up, a stale stamp reinstalls nothing."""
    venv = Path(sys.prefix)
    return subprocess.run(["make", "-s", "-C", str(REPO_ROOT), f"VENV={venv}",
                           "-o", f"{venv}/.dltrain-installed", target],
                          capture_output=True, text=True, timeout=240,
                          env=venv_env(DLTRAIN_RAY_DIR=str(ray_dir)))


def _client(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _read_env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    assert all(line.startswith("export ") and " " not in line[7:] for line in lines), lines
    return dict(line.removeprefix("export ").split("=", 1) for line in lines)


def test_ray_up_starts_one_warm_head_with_all_cpus_and_ray_down_stops_it(
        warm_head_dir: LocalCluster) -> None:
    ray_dir = warm_head_dir.state_dir
    up = _make("ray-up", ray_dir)
    assert up.returncode == 0, up.stdout + up.stderr
    warm_head_dir.state()  # record the head's process group for the teardown

    env = _read_env_file(ray_dir / "env")
    assert sorted(env) == CLIENT_KEYS
    assert env["RAY_AUTH_MODE"] == "token"
    assert Path(env["RAY_AUTH_TOKEN_PATH"]) == ray_dir / "auth_token"
    assert (ray_dir / "auth_token").stat().st_mode & 0o777 == 0o600
    assert (ray_dir / "cluster.json").is_file() and (ray_dir / "logs").is_dir()
    assert up.stdout.splitlines() == [up.stdout.strip()], up.stdout
    assert env["RAY_ADDRESS"] in up.stdout and "make ray-down" in up.stdout, up.stdout

    nproc = int(subprocess.run(["nproc"], capture_output=True, text=True,
                               check=True).stdout)
    client = _client(venv_env(**env))
    assert client.returncode == 0, client.stdout + client.stderr
    assert int(client.stdout) == nproc

    pgids = set(warm_head_dir.pgids)
    again = _make("ray-up", ray_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _read_env_file(ray_dir / "env") == env
    assert env["RAY_ADDRESS"] in again.stdout
    assert {n["pgid"] for n in warm_head_dir.state()["nodes"]} == pgids  # the same head

    down = _make("ray-down", ray_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    for name in ("env", "cluster.json", "auth_token"):
        assert not (ray_dir / name).exists(), name
    assert_stopped(warm_head_dir)
    idle = _make("ray-down", ray_dir)
    assert (idle.returncode, idle.stdout, idle.stderr) == (0, "", "")


def test_a_reused_process_group_id_is_never_signalled_nor_reported_up(
        warm_head_dir: LocalCluster) -> None:
    """The head crashed (its whole group SIGKILLed) and its process group id now belongs to
    another program (a `setsid` sleeper stands in for it, its id written into cluster.json):
    `down` leaves that program alone, says the head is gone and cleans the state; `up` does not
    report "already up" at the dead address, but starts a new head, which `down` stops."""
    import signal

    local = warm_head_dir
    local.run("up", "--workers", "0", "--head-cpus", "1", "--no-dashboard", "--brief")
    head = local.state()["nodes"][0]
    os.killpg(head["pgid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while local.leftover_processes() and time.monotonic() < deadline:
        time.sleep(0.3)
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        crashed = local.state()
        crashed["nodes"][0]["pgid"] = other.pid
        saved = json.dumps(crashed)
        (local.state_dir / "cluster.json").write_text(saved)

        out = local.run("down")
        assert "head is gone" in out and "left alone" in out, out
        assert other.poll() is None  # not signalled
        assert not (local.state_dir / "cluster.json").exists()

        (local.state_dir / "cluster.json").write_text(saved)
        out = local.run("up", "--workers", "0", "--head-cpus", "1", "--no-dashboard",
                        "--brief")
        assert "already" not in out and "Ray head up at" in out, out
        assert other.poll() is None
        new = local.state()
        assert new["nodes"][0]["pgid"] != other.pid
        env = venv_env(**local.client_env())
        client = _client(env)
        assert client.returncode == 0 and int(client.stdout) == 1, client.stdout + client.stderr
        assert "stopped head" in local.run("down")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        local.pgids.discard(other.pid)


def test_client_without_the_token_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.ensure_two_nodes()
    env = venv_env(RAY_ADDRESS=cluster.client_env()["RAY_ADDRESS"], HOME=str(tmp_path))
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    # Ray retries the refused connection a while before it raises.
    refused = _client(env)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert refused.stdout.startswith("ConnectionError: "), refused.stdout
    # The same address with the token works: it was the token that was missing.
    assert _client(venv_env(**cluster.client_env())).returncode == 0


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
    assert (run_dir / "epoch_0002" / "state.safetensors").is_file()
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
    assert not (ws / "models" / "model.safetensors").exists()


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
