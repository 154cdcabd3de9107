"""A Ray head as `ray start --head` starts one, for tests: on loopback, with token
authentication (as the product expects of a running Ray), its temp root in a short directory
of its own, and stopped (its process group) when the block ends, pass or fail."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from helpers.repo import venv_env

NODE_ID = """
import os, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
print(ray.get_runtime_context().get_node_id(), len(ray.nodes()))
"""


@dataclass
class Head:
    """A running head: its address, its node, its temp root (RAY_TMPDIR: a plain ray.init()
    there finds it, as it finds a user's Ray in /tmp/ray), its token and its process group."""
    address: str
    node_id: str
    tmpdir: Path
    token_path: Path
    pgid: int

    def client_env(self, **extra: str) -> dict[str, str]:
        return venv_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                        **extra)

    def env_file(self, ray_dir: Path) -> Path:
        """`ray_dir`/env as `make ray-up` writes it, naming this head: a workspace whose .ray/
        holds it trains on this head (train.ray_address: auto)."""
        ray_dir.mkdir(parents=True, exist_ok=True)
        path = ray_dir / "env"
        path.write_text(f"export RAY_ADDRESS={self.address}\nexport RAY_AUTH_MODE=token\n"
                        f"export RAY_AUTH_TOKEN_PATH={self.token_path}\n")
        return path

    def pids(self) -> set[int]:
        return {p.pid for p in psutil.process_iter() if _pgid(p.pid) == self.pgid}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@contextlib.contextmanager
def ray_head(num_cpus: int, prefix: str) -> Iterator[Head]:
    tmpdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # Ray's socket paths are short
    token_path = tmpdir / "token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = venv_env(RAY_TMPDIR=str(tmpdir), RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0")
    start = subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    pgid = start.pid
    try:
        out, _ = start.communicate(timeout=180)
        assert start.returncode == 0, out
        address = (tmpdir / "ray" / "ray_current_cluster").read_text().strip()
        probe = subprocess.run([sys.executable, "-c", NODE_ID], capture_output=True, text=True,
                               timeout=180, env={**env, "RAY_ADDRESS": address})
        assert probe.returncode == 0, probe.stderr
        node_id = probe.stdout.split()[-2]
        yield Head(address, node_id, tmpdir, token_path, pgid)
    finally:
        stop_group(pgid)
        shutil.rmtree(tmpdir, ignore_errors=True)


def stop_group(pgid: int, grace_s: float = 10) -> None:
    """Stop a head's processes in `ray stop`'s order: the raylet, then the others, then the GCS
    last (SIGTERMed all at once, the GCS and the autoscaler's monitor outlive it and the raylet
    waits on the GCS: the group took its full grace period). What outlives `grace_s` in a step
    is SIGKILLed; returns once the group is gone."""
    procs = [p for p in psutil.process_iter(["name"]) if _pgid(p.pid) == pgid]
    order = {"raylet": 0, "gcs_server": 2}
    for step in range(3):
        batch = [p for p in procs if order.get(p.info["name"], 1) == step]
        for proc in batch:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(batch, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # anything started since the list was taken
    deadline = time.monotonic() + 10
    while [p for p in psutil.process_iter() if _pgid(p.pid) == pgid]:
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
