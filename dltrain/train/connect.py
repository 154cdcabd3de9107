"""Which Ray the train stage runs on, and how it gets there (`train.ray_address`).

    local       a private Ray, started for this run and stopped after it. It never attaches
                to another Ray on the machine (a `ray start --head`, a notebook's ray.init()):
                ray.init(address="local") always starts a new instance.
    auto        the default: RAY_ADDRESS if it is set (Ray's own convention); else this
                workspace's warm Ray (`make ray-up`, recorded in .ray/env) when it answers;
                else as `local`. A Ray that someone else started is never picked by guessing.
    HOST:PORT   that cluster (or ray://HOST:PORT, Ray Client). A cluster with token
                authentication needs its token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH
                (or RAY_AUTH_TOKEN), as `make cluster-up` writes them to .cluster/env.

Reusing a running Ray is where start-up speed comes from: a warm head saves starting Ray's
processes (GCS, raylet, workers) on every run, through Ray's public API alone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dltrain.errors import DltrainError
from dltrain.paths import Workspace, experiment_origin

LOCAL, AUTO = "local", "auto"
# Where `make ray-up` keeps the warm head's address and token (infra/local-cluster/cluster.py).
RAY_DIR_ENV = "DLTRAIN_RAY_DIR"
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class RayConnectError(DltrainError):
    """The Ray cluster named by train.ray_address / RAY_ADDRESS cannot be used."""

    exit_code = 3


@dataclass(frozen=True)
class RayTarget:
    """Where this run trains. `address` None: a private local Ray."""

    address: str | None
    where: str  # for the user: "a private local Ray", "the workspace's warm Ray at ..."
    env: Mapping[str, str] = field(default_factory=dict)  # set before ray is imported
    on_this_machine: bool = True  # its CPUs are this machine's: split them between workers

    @property
    def local(self) -> bool:
        return self.address is None


def ray_dir(ws: Workspace, environ: Mapping[str, str] = os.environ) -> Path:
    """Where `make ray-up` records its warm Ray: the repository's, also for a DVC experiment
    run in a temporary copy of it (dltrain.paths.experiment_origin)."""
    return Path(environ.get(RAY_DIR_ENV) or experiment_origin(ws.root, environ) / ".ray")


def read_env_file(path: Path) -> dict[str, str]:
    """`export KEY=VALUE` lines (the file `make ray-up` and `make cluster-up` write)."""
    env = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.removeprefix("export ").strip().partition("=")
        if sep and key:
            env[key] = value
    return env


def answers(address: str, timeout_s: float = 1.0) -> bool:
    """True if something accepts TCP connections at HOST:PORT (the GCS of a running head)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def resolve(mode: str | None, ws: Workspace,
            environ: Mapping[str, str] = os.environ) -> tuple[RayTarget, str | None]:
    """The Ray to train on, and a note for the user when `auto` passed over a warm Ray that is
    recorded but does not answer."""
    mode = (mode or AUTO).strip()
    if mode == LOCAL:
        return RayTarget(None, "a private local Ray"), None
    if mode != AUTO:
        return RayTarget(mode, f"the Ray cluster at {mode} (train.ray_address)",
                         on_this_machine=False), None
    if environ.get("RAY_ADDRESS"):
        address = environ["RAY_ADDRESS"]
        return RayTarget(address, f"the Ray cluster at {address} (RAY_ADDRESS)",
                         on_this_machine=False), None
    env_file = ray_dir(ws, environ) / "env"
    if not env_file.is_file():
        return RayTarget(None, "a private local Ray"), None
    warm = read_env_file(env_file)
    address = warm.get("RAY_ADDRESS", "")
    if address and answers(address):
        return RayTarget(address, f"the workspace's warm Ray at {address} (make ray-up)",
                         env={k: v for k, v in warm.items() if k in AUTH_ENV}), None
    return (RayTarget(None, "a private local Ray"),
            f"the workspace's warm Ray ({env_file}) does not answer at {address or '?'}; "
            "starting a private one (`make ray-up` starts it again)")


def export_env(target: RayTarget) -> None:
    """Put the target's token settings into this process' environment. Ray reads them when
    it is imported: call this before anything imports ray."""
    os.environ.update(target.env)


def connect(target: RayTarget, cpus: int, runtime_env: dict, *,
            log_to_driver: bool = True) -> float:
    """ray.init for `target` (export_env(target) done); returns the seconds it took.
    Connection failures become one RayConnectError line that says why and what to do.
    `log_to_driver` False: what the job's processes print stays in Ray's logs (a sweep's
    concurrent trials would interleave their epoch lines; the sweep prints its own)."""
    import ray

    started = time.perf_counter()
    # A job-level LoggingConfig also makes Ray print what workers write (the epoch lines)
    # without its "(RayTrainWorker pid=...)" prefix.
    common = {"runtime_env": runtime_env, "logging_level": "ERROR",
              "log_to_driver": log_to_driver,
              "logging_config": ray.LoggingConfig(encoding="TEXT", log_level="ERROR")}
    if target.local:
        # The dashboard is off: nothing in a one-run Ray uses it, and it is one more process
        # to start.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, **common)
        return time.perf_counter() - started
    with stderr_held() as held:
        try:
            ray.init(address=target.address, **common)
        except Exception as exc:  # noqa: BLE001  (Ray raises several types; one line here)
            held.drop()
            raise RayConnectError(connect_failure(target, exc)) from exc
    return time.perf_counter() - started


class _Held:
    def __init__(self) -> None:
        self.keep = True

    def drop(self) -> None:
        self.keep = False


@contextlib.contextmanager
def stderr_held() -> Iterator[_Held]:
    """Hold back what is written to file descriptor 2 inside the block: shown after it, or
    dropped with .drop(). Ray's C++ client logs every failed attempt to reach a cluster (a
    refused token, say) as one warning line, a line a second until ray.init gives up and
    raises; the RayConnectError line says it all."""
    held = _Held()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buffer:
        os.dup2(buffer.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.keep:
                buffer.seek(0)
                sys.stderr.write(buffer.read().decode(errors="replace"))
                sys.stderr.flush()


def connect_failure(target: RayTarget, exc: BaseException) -> str:
    """One line: which cluster, Ray's own words (flattened), and what to check."""
    import ray

    cause = " ".join(str(exc).split()) or type(exc).__name__
    if len(cause) > 400:
        cause = cause[:400] + "..."
    has_token = any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
    token_hint = ("check that RAY_AUTH_TOKEN_PATH names this cluster's token"
                  if has_token else
                  "if the cluster uses token authentication (Ray's default for `ray start`), "
                  "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH; for `make cluster-up` run "
                  "`source .cluster/env`")
    return (f"cannot use {target.where}: {type(exc).__name__}: {cause}. Check that it is "
            f"running and reachable; {token_hint}; a client must run the cluster's Ray version "
            f"(this one runs Ray {ray.__version__}). Or train on a private local Ray: "
            "-S train.ray_address=local")
