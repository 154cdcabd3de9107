"""The real local Prefect stack (infra/prefect/stack.py, what `make stack-up` runs): a server
and a process worker on loopback, deployments from prefect.yaml, and the pipeline run through
`prefect deployment run 'mnist-training/local'` on tiny data in a fresh clone; and the
`scheduled-retraining` deployment on its own pool's worker, which trains on the session's Ray head:
unchanged data skip in seconds, new data retrain.

One server for the whole module (start-up is ~20 s on a busy machine); it and the worker are
stopped in the fixture's teardown, pass or fail, and the teardown checks their pids are gone.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers.data import RAW_FILES, write_raw_dir
from helpers.ray import Head
from helpers.repo import make_clone, venv_env

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

    def api(self, path: str, body: dict | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api_url}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def cli_config(self) -> str:
        """`prefect config view` as the CLI sees it in this environment (no export)."""
        view = self.run("prefect", "config", "view")
        assert view.returncode == 0, view.stdout + view.stderr
        return view.stdout


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory) -> LocalStack:
    root = tmp_path_factory.mktemp("stack")
    clone = make_clone(root / "clone")
    home = root / "prefect-home"
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # No PREFECT_API_URL: every `prefect` command of these tests (deploy, run, the workers)
    # finds the stack through the profile that `up` makes active, as a user's shell would.
    # A run that finds the deployment's slot taken is offered it again after 5 s, not 30; the
    # workers look for scheduled runs every second, not every 10 s (Prefect's default: each
    # deployment run of these tests waited 5 s on average before a worker took it).
    env = venv_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="5",
                   PREFECT_WORKER_QUERY_SECONDS="1")
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    stack = LocalStack(clone=clone, home=home, env=env, api_url=api_url)
    profile_before = re.search(r"^PREFECT_PROFILE='(.*)'", stack.cli_config(), re.M).group(1)
    started: list[int] = []
    try:
        up = stack.stack("up")
        started = stack.pids()
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"Prefect profile dltrain-local is active (PREFECT_API_URL={api_url})" in up.stdout
        config = stack.cli_config()
        assert "PREFECT_PROFILE='dltrain-local'" in config, config
        assert f"PREFECT_API_URL='{api_url}' (from profile)" in config, config
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
        # The profile that was active before `up` is active again.
        assert f"PREFECT_PROFILE='{profile_before}'" in stack.cli_config()
        assert f"the Prefect profile {profile_before} is active again" in down.stdout


def _run_deployment(stack: LocalStack, params: dict, deployment: str = "local"
                    ) -> subprocess.CompletedProcess[str]:
    return stack.run("prefect", "deployment", "run", f"mnist-training/{deployment}",
                     "--params", json.dumps(params), "--watch",
                     "--watch-timeout", str(RUN_TIMEOUT_S), timeout=RUN_TIMEOUT_S + 60)


def _latest_summary(stack: LocalStack, flow_run_id: str | None = None) -> str:
    """The latest summary artifact (of flow run `flow_run_id`, if given)."""
    artifacts = {"key": {"any_": ["mnist-training-summary"]}}
    if flow_run_id:
        artifacts["flow_run_id"] = {"any_": [flow_run_id]}
    found = stack.api("/artifacts/filter", {"artifacts": artifacts, "sort": "CREATED_DESC",
                                            "limit": 1})
    return found[0]["data"]


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


def _flow_run_info(stack: LocalStack, run_id: str) -> dict:
    with urllib.request.urlopen(f"{stack.api_url}/flow_runs/{run_id}", timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def local_deployed(local_stack) -> subprocess.CompletedProcess[str]:
    """`make deploy` on the stack, once for the module (each `deploy.sh` is three Prefect CLI
    start-ups); its result, for the test of the deploy itself."""
    deploy = local_stack.run("bash", "infra/prefect/deploy.sh")
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    return deploy


@pytest.mark.e2e
def test_deploy_and_run_the_pipeline_then_rerun_skips(local_stack, local_deployed, tmp_path):
    """`make deploy` deploys `local` only (not the cluster's schedule), with a concurrency
    limit of 1; a run with a bad parameter fails with its one line; two runs started at once
    take turns: the second waits for the first's slot, then runs and skips every stage."""
    deploy = local_deployed
    assert "mnist-training/local" in deploy.stdout
    assert "scheduled-retraining" not in deploy.stdout
    again = local_stack.run("bash", "infra/prefect/deploy.sh")  # idempotent
    assert again.returncode == 0 and "work pool dltrain-local: exists" in again.stdout
    names = [d["name"] for d in local_stack.api("/deployments/filter", {})]
    assert names == ["local"], names
    deployment = local_stack.api("/deployments/name/mnist-training/local")
    assert deployment["global_concurrency_limit"]["limit"] == 1, deployment
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE", deployment

    # An error of ours: `--watch` shows its one line, and no traceback.
    bad = _run_deployment(local_stack, {"epochs": -1})
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "train.epochs" in bad.stdout and "Traceback" not in bad.stdout, bad.stdout
    assert "Flow run finished in state 'Failed'" in bad.stdout + bad.stderr

    source = write_raw_dir(tmp_path / "source")
    # Local mode: these runs are about the deployment (its limit, its skips), not about Ray.
    params = {"epochs": 1, "num_workers": 0, "overrides": {"data.source": source.as_uri()}}
    runs = [_start_deployment(local_stack, params), _start_deployment(local_stack, params)]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    queued = None
    while True:
        info = {run: _flow_run_info(local_stack, run) for run in runs}
        types = {run: i["state_type"] for run, i in info.items()}
        waiting = [run for run, i in info.items() if i["state_name"] == "AwaitingConcurrencySlot"]
        if waiting and "RUNNING" in types.values():
            queued = waiting[0]  # the slot is taken: it waits instead of failing
        assert list(types.values()).count("RUNNING") <= 1, info
        assert "FAILED" not in types.values() and "CRASHED" not in types.values(), info
        if all(t == "COMPLETED" for t in types.values()):
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
    assert queued, "the second run never waited for the first's slot"
    second = queued
    first = next(run for run in runs if run != second)
    began = {run: _when(info[run]["start_time"]) for run in runs}
    ended = _when(info[first]["end_time"])
    assert began[second] >= ended, info
    print(f"\nconcurrency limit: the second run waited "
          f"{(began[second] - began[first]).total_seconds():.0f} s and started "
          f"{(began[second] - ended).total_seconds():.1f} s after the first ended")

    summary = _latest_summary(local_stack, first)
    for stage in ("download", "preprocess", "train", "evaluate", "register"):
        assert f"| {stage} | ran |" in summary
    versions = _model_versions(local_stack.clone)
    assert versions == ["1"]
    registration = json.loads((local_stack.clone / "reports" / "registration.json").read_text())
    assert str(registration["version"]) == "1"
    summary = _latest_summary(local_stack, second)
    for stage in ("download", "preprocess", "train", "evaluate", "register"):
        assert f"| {stage} | skipped |" in summary
    assert _model_versions(local_stack.clone) == versions  # nothing new registered
    # The MLflow links, read back through the API: the embedded store, where `make
    # mlflow-ui` serves it (MLFLOW_PORT unset: 5000).
    links = local_stack.api("/artifacts/filter", {"artifacts": {
        "key": {"any_": ["mnist-model", "mnist-mlflow-run"]},
        "flow_run_id": {"any_": [first]}}})
    assert sorted(a["data"].rsplit("(", 1)[1] for a in links) == [
        f"http://127.0.0.1:5000/#/models/mnist-mlp/versions/{registration['version']})",
        f"http://127.0.0.1:5000/#/runs/{registration['run_id']})"], links


def _start_deployment(stack: LocalStack, params: dict) -> str:
    """`prefect deployment run` without waiting; returns the flow run's id."""
    started = stack.run("prefect", "deployment", "run", "mnist-training/local",
                        "--params", json.dumps(params))
    assert started.returncode == 0, started.stdout + started.stderr
    found = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout)
    assert found, started.stdout
    return found.group(1)


def _flow_run_state(stack: LocalStack, run_id: str) -> str:
    with urllib.request.urlopen(f"{stack.api_url}/flow_runs/{run_id}", timeout=10) as resp:
        return json.loads(resp.read())["state_type"]


def _unfinished_checkpoint(clone: Path) -> bool:
    """A Ray Train run of this clone has written its first checkpoint and is not complete."""
    return any(not (ckpt.parent / "dltrain-complete.json").exists()
               for ckpt in (clone / ".ray_results").glob("*/epoch_0001"))


def _alive_in(procs: set[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline()[:3])}")
        except psutil.NoSuchProcess:
            pass
    return left


def _dvc_locks_free(clone: Path) -> None:
    """DVC's repo lock can be taken, its rwlock names no live process, the flow's lock is free."""
    from dvc.repo import Repo

    from flows.workspace import workspace_lock

    with Repo(str(clone)) as repo, repo.lock:
        pass
    rwlock = clone / ".dvc" / "tmp" / "rwlock"
    if rwlock.exists():
        holders = [info["pid"] for mode in json.loads(rwlock.read_text() or "{}").values()
                   for infos in mode.values() for info in ([infos] if isinstance(infos, dict)
                                                           else infos)]
        assert not [pid for pid in holders if psutil.pid_exists(pid)], rwlock.read_text()
    with workspace_lock(clone, "test"):
        pass


# What is SIGKILLed while `train` runs: the worker's process group (Prefect 3.9 starts the
# flow run in a session of its own, so the flow run is not in it), or that and the flow run's.
# A distinct epoch count each: the second case must not find the first one's train up to date.
KILLS = {"worker": 30, "worker-and-flow-run": 31}


@pytest.mark.e2e
@pytest.mark.parametrize("victims", list(KILLS))
def test_worker_killed_mid_train_then_the_rerun_resumes_from_the_dvc_cache(
        local_stack, local_deployed, tmp_path, victims):
    """Fault 5 of RELIABILITY.md: SIGKILL the worker (and its flow run) while `train` runs. The
    stage (dvc, `dltrain train`, Ray) is stopped with its flow run, DVC's locks are free; after
    the worker is restarted, a new run skips download and preprocess (DVC) and finishes."""
    clone = local_stack.clone
    params_before = (clone / "params.yaml").read_text()
    source = write_raw_dir(tmp_path / "source")
    epochs = KILLS[victims]
    params = {"epochs": epochs, "num_workers": 1,
              "overrides": {"data.source": source.as_uri(), "train.batch_size": 32}}
    worker = psutil.Process(int((local_stack.home / "stack" / "worker.pid").read_text()))
    tree: set[psutil.Process] = set()
    try:
        run_id = _start_deployment(local_stack, params)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not _unfinished_checkpoint(clone):  # train is running, with a checkpoint
            tree |= set(worker.children(recursive=True))
            assert _flow_run_state(local_stack, run_id) in ("SCHEDULED", "PENDING", "RUNNING")
            assert time.monotonic() < deadline, "train did not start"
            time.sleep(0.2)
        tree |= set(worker.children(recursive=True))
        names = " ".join(_alive_in(tree))
        assert "dltrain train" in names, names
        assert "ray::RayTrainWorker" in names, names
        flow_run = [p for p in worker.children() if "prefect.engine" in " ".join(p.cmdline())]
        assert len(flow_run) == 1, [p.cmdline() for p in worker.children()]
        groups = [os.getpgid(worker.pid)]
        if victims == "worker-and-flow-run":
            groups.append(os.getpgid(flow_run[0].pid))
        assert len(set(groups)) == len(groups)  # the flow run has a process group of its own
        killed = time.monotonic()
        for pgid in groups:
            os.killpg(pgid, signal.SIGKILL)
        while left := _alive_in(tree):
            assert time.monotonic() - killed < 60, f"still running 60 s after the kill: {left}"
            time.sleep(0.2)
        print(f"\nfault 5 ({victims} killed): every process of the stage gone "
              f"{time.monotonic() - killed:.1f} s after the kill ({len(tree)} processes)")
    finally:
        for proc in tree:  # pass or fail, nothing of the stage outlives the test
            if _alive_in({proc}):
                proc.kill()
    assert not (clone / "models" / "model.safetensors").exists()  # the kill interrupted train
    _dvc_locks_free(clone)
    # Its worker gone, the flow run ends itself at its next log line (rich's console exits on
    # the broken pipe) and reports Crashed; SIGKILLed, it cannot, and the API keeps showing
    # it Running (RELIABILITY.md: Prefect's zombie-flow automation).
    state = _flow_run_state(local_stack, run_id)
    assert state == ("CRASHED" if victims == "worker" else "RUNNING")
    if state == "RUNNING":
        # What Prefect's "Detect zombie flows" automation does (docs/troubleshooting.md):
        # mark the run Crashed. Leaving Running frees its deployment's concurrency slot now;
        # without it the re-run waits in AwaitingConcurrencySlot until the slot's lease,
        # no longer renewed, runs out (RELIABILITY.md's open points).
        local_stack.api(f"/flow_runs/{run_id}/set_state", {
            "state": {"type": "CRASHED", "name": "Crashed",
                      "message": "its process was killed (marked by the test)"},
            "force": True})
        assert _flow_run_state(local_stack, run_id) == "CRASHED"

    up = local_stack.stack("up")  # the worker again (the server kept running)
    assert up.returncode == 0 and "starting a process worker" in up.stdout, up.stdout + up.stderr
    started = time.monotonic()
    rerun = _run_deployment(local_stack, params)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "Completed" in rerun.stdout
    print(f"fault 5 ({victims}): the re-run took {time.monotonic() - started:.0f} s")
    summary = _latest_summary(local_stack)
    for stage in ("download", "preprocess"):
        assert f"| {stage} | skipped |" in summary, summary
    for stage in ("train", "evaluate", "register"):
        assert f"| {stage} | ran |" in summary, summary
    report = json.loads((clone / "reports" / "training.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, epochs + 1))
    attempts = [e["attempt"] for e in report["epochs"]]
    assert attempts == sorted(attempts) and attempts[-1] <= 1  # one run, or one resumption
    assert report["resumed"] == (attempts[0] == 0 and attempts[-1] == 1)
    print(f"fault 5 ({victims}): the re-run {'resumed' if report['resumed'] else 'restarted'} "
          f"(attempt 0 trained epochs 1-{attempts.count(0)})")
    from dltrain.model.torchio import load_model

    _model, card = load_model(clone / "models" / "model.safetensors")
    assert card["params"]["train"]["epochs"] == epochs
    # params.yaml as it was; DVC finds nothing changed but the run's own overrides.
    assert (clone / "params.yaml").read_text() == params_before
    status = local_stack.run("dvc", "status", "--json")
    assert status.returncode == 0, status.stderr
    overridden = {"data.source", "train.batch_size", "train.epochs", "train.num_workers"}
    for stage, changes in json.loads(status.stdout).items():
        for change in changes:
            if (stage, change) == ("check", "always changed"):
                continue  # the freshness check runs every time, by design
            assert set(change) == {"changed deps"}, (stage, change)
            assert set(change["changed deps"]) == {"params.yaml"}, (stage, change)
            assert set(change["changed deps"]["params.yaml"]) <= overridden, (stage, change)


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


# --- the scheduled deployment: unchanged data skip, new data retrain ------------------------

RAY_POOL = "dltrain-ray"


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it if it is still there after 30 s."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def ray_pool_worker(local_stack: LocalStack, session_ray: Head,
                    tmp_path_factory) -> Iterator[dict[str, str]]:
    """What `scheduled-retraining` runs on: a running Ray head (the session's: 2 CPUs, token
    auth, on loopback; these tests are about the deployment, not about starting a Ray) and a
    process worker for the dltrain-ray pool with RAY_ADDRESS and the head's token in its
    environment, as `make ray-up`'s .ray/env gives them. The worker is stopped in teardown,
    pass or fail."""
    state = tmp_path_factory.mktemp("ray-pool-worker")
    ray_env = dict(line.removeprefix("export ").split("=", 1)
                   for line in session_ray.env_file(state).read_text().splitlines() if line)
    assert ray_env.get("RAY_ADDRESS"), ray_env
    worker = None
    try:
        with open(state / "worker.log", "ab") as log:  # the worker keeps its own copy
            worker = subprocess.Popen(
                [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                 RAY_POOL, "--type", "process", "--name", "dltrain-ray-e2e",
                 "--install-policy", "never"], cwd=local_stack.clone,
                env={**local_stack.env, **ray_env}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 180
        while not any(w.get("status") == "ONLINE" for w in _pool_workers(local_stack)):
            assert worker.poll() is None, (state / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the dltrain-ray worker did not come online"
            time.sleep(1)
        yield ray_env
    finally:
        if worker is not None:
            _stop_group(worker)


def _pool_workers(stack: LocalStack) -> list[dict]:
    try:
        return stack.api(f"/work_pools/{RAY_POOL}/workers/filter", {})  # type: ignore[return-value]
    except OSError:
        return []  # the pool does not exist yet: the worker creates it


def _flow_run(stack: LocalStack, output: str) -> dict:
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert found, output
    with urllib.request.urlopen(f"{stack.api_url}/flow_runs/{found.group(1)}",
                                timeout=10) as resp:
        return json.loads(resp.read())


def _when(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _from_pickup(stack: LocalStack, run: dict) -> float:
    """Seconds from the worker taking the run (PENDING: it then starts the flow run's
    process) to the run's end: the process start-up included, the worker's polling not."""
    with urllib.request.urlopen(f"{stack.api_url}/flow_run_states/?flow_run_id={run['id']}",
                                timeout=10) as resp:
        states = json.loads(resp.read())
    pending = min(_when(s["timestamp"]) for s in states if s["type"] == "PENDING")
    return (_when(run["end_time"]) - pending).total_seconds()


def _task_names(stack: LocalStack, flow_run_id: str) -> list[str]:
    runs = stack.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return sorted(r["name"].rsplit("-", 1)[0] for r in runs)  # type: ignore[union-attr]


@pytest.mark.e2e
def test_scheduled_retraining_skips_unchanged_data_in_seconds_and_retrains_on_new_data(
        local_stack, ray_pool_worker, tmp_path):
    """The `scheduled-retraining` deployment (its own parameters: RAY_ADDRESS from the
    worker's environment, 2 workers), run as its schedule would run it, with data.source a
    directory: a first run trains and registers; a run with the data unchanged ends after the
    freshness check in seconds, starts no other stage (no Ray) and registers nothing; after
    the directory gets new files, the next run retrains and registers a new version, and the
    run's markdown artifact says which happened and why."""
    clone = local_stack.clone
    deploy = local_stack.run("bash", "infra/prefect/deploy.sh", "cluster")  # make deploy-cluster
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "mnist-training/scheduled-retraining" in deploy.stdout
    source = write_raw_dir(tmp_path / "source", n_train=400, n_test=100, seed=1)
    params = {"epochs": 1, "overrides": {"data.source": str(source)}}
    versions = _model_versions(clone)

    first = _run_deployment(local_stack, params, "scheduled-retraining")
    assert first.returncode == 0 and "Completed" in first.stdout, first.stdout + first.stderr
    summary = _latest_summary(local_stack)
    for stage in ("check", "download", "preprocess", "train", "evaluate", "register"):
        assert f"| {stage} | ran |" in summary, summary
    report = json.loads((clone / "reports" / "training.json").read_text())
    assert report["world_size"] == 2  # the deployment's num_workers, on the worker's Ray
    versions_after_first = _model_versions(clone)
    assert len(versions_after_first) == len(versions) + 1
    registration = (clone / "reports" / "registration.json").read_text()
    lock = (clone / "dvc.lock").read_text()

    # Unchanged data: skipped after the check, in seconds, no Ray, nothing registered.
    started = time.monotonic()
    second = _run_deployment(local_stack, params, "scheduled-retraining")
    wall = time.monotonic() - started
    assert second.returncode == 0 and "Completed" in second.stdout, second.stdout + second.stderr
    run = _flow_run(local_stack, second.stdout)
    took = (_when(run["end_time"]) - _when(run["start_time"])).total_seconds()
    picked = _from_pickup(local_stack, run)
    print(f"\nscheduled run, data unchanged: flow run {took:.1f} s (start to end), "
          f"{picked:.1f} s from the worker's pickup (its process start-up included), "
          f"`prefect deployment run --watch` {wall:.1f} s (the worker's polling included)")
    assert took <= 10, f"the skipped run took {took:.1f} s"
    assert _task_names(local_stack, run["id"]) == ["check"]  # no train task: no Ray
    summary = _latest_summary(local_stack)
    assert "**skipped: data unchanged**" in summary, summary
    assert f"source `{source}`" in summary
    assert "nothing registered in this run" in summary
    assert _model_versions(clone) == versions_after_first
    assert (clone / "reports" / "registration.json").read_text() == registration
    assert (clone / "dvc.lock").read_text() == lock

    # New files in the directory: the next run retrains and registers a new version.
    other = write_raw_dir(tmp_path / "other", n_train=300, n_test=100, seed=2)
    for name in RAW_FILES.values():
        shutil.copyfile(other / name, source / name)
    started = time.monotonic()
    third = _run_deployment(local_stack, params, "scheduled-retraining")
    assert third.returncode == 0 and "Completed" in third.stdout, third.stdout + third.stderr
    run = _flow_run(local_stack, third.stdout)
    print(f"scheduled run after new data: flow run "
          f"{(_when(run['end_time']) - _when(run['start_time'])).total_seconds():.1f} s "
          f"(start to end), {_from_pickup(local_stack, run):.1f} s from the worker's pickup, "
          f"`prefect deployment run --watch` {time.monotonic() - started:.1f} s")
    summary = _latest_summary(local_stack)
    assert "**retrained: the data changed**" in summary, summary
    for stage in ("download", "preprocess", "train", "evaluate", "register"):
        assert f"| {stage} | ran |" in summary, summary
    assert "train: 270 samples" in summary  # 300 new images, 10% to val
    new_versions = _model_versions(clone)
    assert len(new_versions) == len(versions_after_first) + 1
    reg = json.loads((clone / "reports" / "registration.json").read_text())
    assert str(reg["version"]) == max(new_versions, key=int)
    assert set(reg["aliases"]) & {"champion", "challenger"}, reg
    assert "registered a new version" in summary and reg["reason"] in summary
