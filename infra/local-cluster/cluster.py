"""A real multi-node Ray cluster on one machine: a head node and N worker nodes, each a separate
`ray start` with its own CPU count, its own ports and its own process group.

    python infra/local-cluster/cluster.py up --workers 2     # start (or complete) the cluster
    python infra/local-cluster/cluster.py status             # its address and nodes
    python infra/local-cluster/cluster.py env                # the export lines for a client
    python infra/local-cluster/cluster.py add-node           # one more worker node
    python infra/local-cluster/cluster.py kill-node worker-1 # SIGKILL one node (a crash)
    python infra/local-cluster/cluster.py down               # stop exactly this cluster

`make cluster-up WORKERS=N` / `make cluster-down` call this. State lives in
$DLTRAIN_CLUSTER_DIR (default: <repo>/.cluster, git-ignored): cluster.json (address, nodes,
their process groups), the cluster's auth token, env (the export lines) and the node logs.
`make ray-up` / `make ray-down` use it for the workspace's warm single-node head, with the state
in $DLTRAIN_RAY_DIR (default: <repo>/.ray):
`up --workers 0 --head-cpus $(nproc) --head-gpus auto --no-dashboard --brief`.

Why it is built this way:
- Each node runs `ray start --block` as the leader of its own process group (setsid), and every
  process Ray starts for that node stays in the group; so `down` and `kill-node` stop exactly
  the processes of this cluster. `ray stop` is never used: it stops every Ray on the machine,
  other users' local Ray included.
- Ray's temp dir is our own (a short /tmp path: Ray's Unix sockets live there and their paths
  are limited to ~107 bytes), so Ray writes no /tmp/ray/ray_current_cluster and a plain
  `ray.init()` elsewhere on the machine never attaches to this cluster by accident.
- ray 2.60 turns token authentication on for `ray start` clusters. The token is generated
  here, kept in the state dir (mode 0600) and handed to every node and client through
  RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH; ~/.ray/auth_token is left alone.
- Every node is started with --node-ip-address 127.0.0.1, and the head's GCS is first reached
  at 127.0.0.1:PORT. Ray registers a loopback node under the machine's own IP, and that is the
  cluster's address: it is read back from Ray once the head has joined (the head's
  NodeManagerAddress in ray.nodes()), not predicted. The GCS and the raylet listen on all
  interfaces, some agents on the machine's address (docs/security.md): `ray start` documents
  no option to bind them to loopback, so the token is what protects them.
- A recorded process group is signalled only while it is still that node's: a group id is
  reused once the group is gone (a crash, a reboot). `up` records each node's `ray start`
  command line and start time; `down`, `up` and `kill-node` check them (group_is_node).
- Which nodes have joined is asked of Ray through its public API: this process connects as a
  driver (ray.init with the cluster's address and token) once per command, reads ray.nodes()
  and disconnects at the end. The CLI's node listing (`ray list nodes`) needs the dashboard,
  which the warm head goes without.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
JOIN_TIMEOUT_S = float(os.environ.get("DLTRAIN_CLUSTER_TIMEOUT_S", "180"))
# Per-node object store: Ray's default (30% of RAM per node) would ask for several GB per
# node; the pipeline passes only small objects through it.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}


class ClusterError(RuntimeError):
    """The cluster could not be started or changed; the message says why and where to look."""


@dataclass
class NodeRecord:
    name: str
    pgid: int  # `ray start --block` leads the node's process group
    cpus: int
    node_id: str | None = None
    gpus: int = 0  # as Ray counted them when the node joined
    # Who leads the group, as recorded at start: a process group id is reused once the group
    # is gone (a crash, a reboot), and only a leader with this command line and this start
    # time is this node's `ray start`.
    cmdline: list[str] | None = None
    started: float | None = None  # psutil's create_time of the leader


@dataclass
class ClusterState:
    state_dir: Path
    address: str = ""
    temp_dir: str = ""
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    workers_started: int = 0  # names worker nodes: a replacement never reuses a dead one's name

    @property
    def file(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def token_path(self) -> Path:
        return self.state_dir / "auth_token"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState:
        state = cls(state_dir=state_dir)
        if state.file.is_file():
            data = json.loads(state.file.read_text())
            state.address, state.temp_dir = data["address"], data["temp_dir"]
            state.workers_started = data.get("workers_started", len(data["nodes"]))
            state.nodes = {n["name"]: NodeRecord(**n) for n in data["nodes"]}
        return state

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": self.address, "temp_dir": self.temp_dir,
                                   "workers_started": self.workers_started,
                                   "nodes": [asdict(n) for n in self.nodes.values()]},
                                  indent=2))
        tmp.replace(self.file)

    def client_env(self) -> dict[str, str]:
        """What a driver (dltrain train, a Prefect worker) needs to reach the cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def export_lines(self) -> str:
        return "".join(f"export {k}={v}\n" for k, v in self.client_env().items())


# --------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the id now belongs to someone else's group: not ours
        return False
    return _group_members(pgid) != []


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _token_path(pid: int) -> str | None:
    try:
        return psutil.Process(pid).environ().get("RAY_AUTH_TOKEN_PATH")
    except (psutil.Error, OSError):
        return None


def _runs(actual: list[str], given: list[str]) -> bool:
    """`actual` (a process's command line) is the command `given` to Popen: its arguments
    after the program, behind whatever ran the program (`ray` is a Python script, so the
    kernel runs it as `python .../ray start ...`)."""
    args = given[1:]
    return bool(given) and actual[len(actual) - len(args):] == args and any(
        Path(part).name == Path(given[0]).name for part in actual[:len(actual) - len(args)])


def group_is_node(record: NodeRecord, state: ClusterState) -> bool:
    """The recorded process group is alive and is still this node's: its leader is the
    `ray start` recorded at start (command line and start time), or, once the leader has
    exited, every process left in the group carries this cluster's token path in its
    environment (node_env gives it to every process of a node). Anything else is another
    program that got the id: never signalled."""
    if not group_alive(record.pgid):
        return False
    try:
        leader = psutil.Process(record.pgid)
        if leader.status() != psutil.STATUS_ZOMBIE:
            if record.started is None:  # a record from before start times were kept
                cmdline = leader.cmdline()
                return "start" in cmdline and record.name in cmdline and "--block" in cmdline
            return (abs(leader.create_time() - record.started) < 0.05
                    and _runs(leader.cmdline(), record.cmdline or []))
    except psutil.NoSuchProcess:
        pass
    except psutil.Error:
        return False
    token = str(state.token_path)
    members = _group_members(record.pgid)
    return bool(members) and all(_token_path(pid) == token for pid in members)


def stop_group(pgid: int, grace_s: float) -> None:
    """Stop the node's Ray processes in `ray stop`'s order: the raylet, then the others, the
    GCS last, each step SIGTERMed and given `grace_s`; then SIGKILL whatever of the group is
    left: the node's `ray start --block` (the group's leader), which has nothing left to stop.
    SIGTERMed, it first marks its node draining and waits on Ray's drain timeout (30 s; meant
    for Serve's replicas): every stop took its whole grace. Returns once the group is gone."""
    if grace_s > 0:
        procs: dict[psutil.Process, str] = {}
        for pid in _group_members(pgid):
            if pid == pgid:
                continue
            try:
                proc = psutil.Process(pid)
                procs[proc] = proc.name()
            except psutil.Error:
                continue
        step_of = {"raylet": 0, "gcs_server": 2}
        for step in range(3):
            batch = [proc for proc, name in procs.items() if step_of.get(name, 1) == step]
            for proc in batch:
                try:
                    proc.terminate()
                except psutil.Error:
                    pass
            psutil.wait_procs(batch, timeout=grace_s)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)


def node_env(state: ClusterState) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state.token_path))
    # Every Ray process of the cluster inherits this: code inside it that looks the cluster up
    # without an address (Ray Train's placement-group cleaner does) would otherwise fail with
    # "Found multiple active Ray instances" when another Ray runs on the machine.
    env["RAY_ADDRESS"] = state.address
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _ray() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def start_node(state: ClusterState, name: str, cpus: int, *, head: bool,
               dashboard: bool = False, gpus: int | None = 0) -> NodeRecord:
    """Start one node (`gpus` None: Ray detects them). The head's address is 127.0.0.1:PORT
    until it has joined (see up()), and that is the RAY_ADDRESS its processes get: a client on
    this machine reaches the same GCS through it."""
    cmd = [_ray(), "start", "--block", "--node-ip-address", HOST, "--node-name", name,
           "--num-cpus", str(cpus), "--object-store-memory", str(OBJECT_STORE_BYTES),
           # Every port that has a fixed default gets a free one: several nodes share this
           # machine. Worker ports 0/0: the OS picks them (as ray.cluster_utils does).
           "--dashboard-agent-listen-port", str(free_port()),
           "--min-worker-port", "0", "--max-worker-port", "0",
           "--disable-usage-stats", "--log-style", "record"]
    if gpus is not None:
        cmd += ["--num-gpus", str(gpus)]
    if head:
        gcs_port = free_port()
        state.address = f"{HOST}:{gcs_port}"
        cmd += ["--head", "--port", str(gcs_port), "--temp-dir", state.temp_dir,
                "--ray-client-server-port", str(free_port()),
                "--include-dashboard", "true" if dashboard else "false",
                "--dashboard-port", str(free_port())]
    else:
        # One log monitor per machine: the nodes share Ray's temp dir, so a second monitor
        # would print every worker line twice (ray.cluster_utils does the same).
        cmd += ["--address", state.address, "--include-log-monitor", "false"]
    state.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(state.logs_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=node_env(state), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=REPO_ROOT)
    # The start time is the fork's, so it can be read at once; the command line is the one
    # given to Popen (read back now, it could still be this process's, before the exec).
    record = NodeRecord(name=name, pgid=proc.pid, cpus=cpus, cmdline=cmd,
                        started=psutil.Process(proc.pid).create_time())
    state.nodes[name] = record
    state.save()
    return record


# --------------------------------------------------------------------------- Ray's view

def gcs_answers(address: str) -> bool:
    """True if something accepts TCP connections at HOST:PORT: checked before ray.init, which
    would otherwise keep retrying a head that is not up (or gone) before it fails."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def connect(state: ClusterState) -> bool:
    """Connect this process to the cluster as a Ray driver, once per command; False if the
    cluster does not answer (not up yet, or gone: the caller decides what that means)."""
    # main() has put the token in this process' environment before ray is first imported
    # here (Ray reads RAY_AUTH_* once, at import).
    import ray

    if ray.is_initialized():
        return True
    if not gcs_answers(state.address):
        return False
    try:
        # No log lines of its own, and none forwarded from the cluster's workers.
        ray.init(address=state.address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError):  # RuntimeError: no raylet of it on this machine
        return False
    return True


def disconnect() -> None:
    """End the driver connection that connect() made, if any."""
    ray = sys.modules.get("ray")  # only connect() imports it
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def alive_nodes(state: ClusterState) -> dict[str, dict]:
    """node name -> Ray's record (a ray.nodes() entry) of each of the cluster's alive nodes;
    {} if the cluster does not answer."""
    if not state.address or not connect(state):
        return {}
    import ray

    return {node["NodeName"]: node for node in ray.nodes() if node["Alive"]}


def wait_for_nodes(state: ClusterState, names: list[str], timeout_s: float) -> dict[str, dict]:
    """Wait until every named node has joined, record its node ID and GPUs, and return Ray's
    records of the alive nodes; a node whose processes died fails at once."""
    if not names:
        return {}
    deadline = time.monotonic() + timeout_s
    while True:
        alive = alive_nodes(state)
        for name in names:
            if name in alive:
                record = state.nodes[name]
                record.node_id = alive[name]["NodeID"]
                record.gpus = int(alive[name]["Resources"].get("GPU", 0))
        missing = [n for n in names if n not in alive]
        if not missing:
            state.save()
            return alive
        dead = [n for n in missing if not group_alive(state.nodes[n].pgid)]
        if dead:
            raise ClusterError(f"node(s) {', '.join(dead)} exited while starting; see "
                               + ", ".join(str(state.logs_dir / f"{n}.log") for n in dead))
        if time.monotonic() > deadline:
            raise ClusterError(f"node(s) {', '.join(missing)} did not join within "
                               f"{timeout_s:.0f}s; see their logs in {state.logs_dir}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- commands

def head_running(state: ClusterState) -> bool:
    """The recorded head is still this cluster's `ray start` (group_is_node): never a process
    group whose id another program got. Its GCS is not asked: a slow answer from a busy
    machine must not make `up` stop a head that works."""
    head = state.nodes.get("head")
    return head is not None and group_is_node(head, state)


def up(state: ClusterState, workers: int, head_cpus: int, worker_cpus: int, dashboard: bool,
       timeout_s: float, head_gpus: int | None = 0, quiet: bool = False) -> ClusterState:
    """Start the head and `workers` worker nodes; a running cluster is completed, not
    restarted (idempotent). Worker nodes get no GPUs: nodes on one machine would each claim
    the same ones."""
    if not head_running(state):
        down(state, quiet=True)  # leftovers of a crashed cluster
        state = ClusterState(state_dir=state.state_dir)
        state.state_dir.mkdir(parents=True, exist_ok=True)
        _write_token(state.token_path)
        state.temp_dir = tempfile.mkdtemp(prefix="dltrain-ray-")
        start_node(state, "head", head_cpus, head=True, dashboard=dashboard, gpus=head_gpus)
        joined = wait_for_nodes(state, ["head"], timeout_s)
        # The address Ray registered for the loopback head (see the module docstring): what
        # the worker nodes join and clients use.
        port = state.address.rpartition(":")[2]
        state.address = f"{joined['head']['NodeManagerAddress']}:{port}"
        state.save()
        if not quiet:
            print(f"head node up at {state.address} ({head_cpus} CPU)", flush=True)
    running = [n for n, r in state.nodes.items() if n != "head" and group_is_node(r, state)]
    started = [add_node(state, worker_cpus, wait=False).name
               for _ in range(max(0, workers - len(running)))]
    wait_for_nodes(state, started, timeout_s)
    if not quiet:
        for name in started:
            print(f"worker node {name} joined ({worker_cpus} CPU)", flush=True)
    _write_env(state)
    return state


def add_node(state: ClusterState, cpus: int, wait: bool = True,
             timeout_s: float = JOIN_TIMEOUT_S) -> NodeRecord:
    if not state.address:
        raise ClusterError(f"no cluster in {state.state_dir}; run `make cluster-up` first")
    state.workers_started += 1
    record = start_node(state, f"worker-{state.workers_started}", cpus, head=False)
    if wait:
        wait_for_nodes(state, [record.name], timeout_s)
    return record


def kill_node(state: ClusterState, which: str) -> NodeRecord:
    """SIGKILL every process of one node at once: what a machine crash looks like to Ray."""
    for record in state.nodes.values():
        if which in (record.name, record.node_id):
            if group_is_node(record, state):
                stop_group(record.pgid, grace_s=0)
            del state.nodes[record.name]
            state.save()
            return record
    raise ClusterError(f"no node {which!r} in this cluster; nodes: {', '.join(state.nodes)}")


def down(state: ClusterState, quiet: bool = False) -> None:
    """Stop exactly this cluster's nodes (workers first), remove its Ray temp dir and token.
    A node whose process group is gone, or now belongs to another program, is not signalled:
    it is said to be gone, and its record removed with the rest."""
    for name in sorted(state.nodes, key=lambda n: n == "head"):
        record = state.nodes[name]
        if group_is_node(record, state):
            stop_group(record.pgid, grace_s=5)
            message = f"stopped {name}"
        elif group_alive(record.pgid):
            message = (f"{name} is gone (its process group {record.pgid} now belongs to "
                       "another program, which was left alone)")
        else:
            message = f"{name} is gone (its processes had exited)"
        if not quiet:
            print(message, flush=True)
    if state.temp_dir:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    for path in (state.file, state.token_path, state.state_dir / "env"):
        path.unlink(missing_ok=True)


def _write_token(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))


def _write_env(state: ClusterState) -> None:
    (state.state_dir / "env").write_text(state.export_lines())


def describe(state: ClusterState) -> str:
    alive = alive_nodes(state) if head_running(state) else {}
    lines = [f"cluster {state.address or '(none)'}  state {state.state_dir}"]
    for record in state.nodes.values():
        status = "alive" if record.name in alive else "DOWN"
        lines.append(f"  {record.name:<10} {record.cpus} CPU  {status:<5}  "
                     f"node {record.node_id or '?'}  pgid {record.pgid}")
    return "\n".join(lines)


def head_summary(state: ClusterState, already: bool) -> str:
    """One line: where the head is and what it has (`up --brief`, for `make ray-up`)."""
    head = state.nodes["head"]
    gpus = f", {head.gpus} GPU{'s' if head.gpus != 1 else ''}" if head.gpus else ""
    return (f"Ray head {'already ' if already else ''}up at {state.address} "
            f"({head.cpus} CPU{'s' if head.cpus != 1 else ''}{gpus})")


def gpu_count(text: str) -> int | None:
    """--head-gpus: a number, or `auto` (None: Ray detects the machine's GPUs)."""
    return None if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", type=Path,
                        default=Path(os.environ.get("DLTRAIN_CLUSTER_DIR")
                                     or REPO_ROOT / ".cluster"))
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the cluster (or complete it), print its address")
    p_up.add_argument("--workers", type=int, default=1)
    p_up.add_argument("--head-cpus", type=int, default=1)
    p_up.add_argument("--head-gpus", type=gpu_count, default=0,
                      help="GPUs of the head node, or `auto`: the ones Ray finds (default 0)")
    p_up.add_argument("--worker-cpus", type=int, default=1)
    p_up.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True)
    p_up.add_argument("--timeout", type=float, default=JOIN_TIMEOUT_S)
    p_up.add_argument("--brief", action="store_true",
                      help="print one line: the head's address and resources")
    p_add = sub.add_parser("add-node", help="start one more worker node, print its name")
    p_add.add_argument("--cpus", type=int, default=1)
    p_kill = sub.add_parser("kill-node", help="SIGKILL one node (by name or Ray node ID)")
    p_kill.add_argument("node")
    sub.add_parser("down", help="stop exactly this cluster")
    sub.add_parser("status", help="the address and the nodes")
    sub.add_parser("env", help="print the export lines for a client")
    args = parser.parse_args(argv)

    state = ClusterState.load(args.state_dir.resolve())
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(state.token_path))
    try:
        if args.command == "up":
            already = head_running(state)
            state = up(state, args.workers, args.head_cpus, args.worker_cpus, args.dashboard,
                       args.timeout, head_gpus=args.head_gpus, quiet=args.brief)
            if args.brief:
                print(head_summary(state, already))
            else:
                print(describe(state))
                print(f"cluster address: {state.address}\nfor clients:\n"
                      f"{state.export_lines()}(or: source {state.state_dir / 'env'})")
        elif args.command == "add-node":
            record = add_node(state, args.cpus)
            print(f"{record.name} {record.node_id}")
        elif args.command == "kill-node":
            record = kill_node(state, args.node)
            print(f"killed {record.name} {record.node_id}")
        elif args.command == "down":
            down(state)
        elif args.command == "status":
            print(describe(state))
        else:
            print(state.export_lines(), end="")
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
