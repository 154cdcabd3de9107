"""The train stage: pre-flight checks, which Ray it runs on, and real Ray Train runs on a
private local Ray, beside a user's own Ray, and on a running one."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from dltrain.config import load_params, params_from_dict
from dltrain.errors import (
    CertainTrainingError,
    ConfigError,
    NotWritableError,
    TrainingError,
)
from dltrain.model.torchio import load_model
from dltrain.paths import Workspace
from dltrain.train.connect import RayTarget, read_env_file, resolve
from dltrain.train.preflight import (
    changed_params,
    check_memory,
    check_processed,
    plan_resources,
    run_key,
)
from dltrain.train.stage import train
from dltrain.train.storage import FAILURE_FILE, check_storage

from helpers.data import make_processed
from helpers.mlflow import training_runs
from helpers.ray import NODE_ID, Head
from helpers.repo import venv_env


def params(**train_overrides):
    train_section = {"epochs": 2, "batch_size": 32, "num_workers": 1, "max_failures": 0}
    train_section.update(train_overrides)
    return params_from_dict({"model": {"hidden_sizes": [64]}, "train": train_section})


# ----------------------------------------------------------------------------- pre-flight

def test_missing_processed_data_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"summary.json is missing .*dltrain preprocess"):
        check_processed(tmp_path / "data" / "processed", "fashion-mnist")


def test_processed_data_of_another_dataset_is_refused(processed_ws: Path) -> None:
    with pytest.raises(TrainingError, match="is 'fashion-mnist', but data.dataset is 'mnist'"):
        check_processed(processed_ws / "data" / "processed", "mnist")


@pytest.mark.parametrize("workers,use_gpu,cpus,gpus,message", [
    (3, False, 2, 0, "train.num_workers is 3, but this machine has only 2 CPUs"),
    (1, True, 2, 0, "train.use_gpu is true with 1 workers, but this machine has no GPU"),
    (2, True, 4, 1, "has only 1 GPUs"),
])
def test_oversubscription_fails_with_the_limit(workers, use_gpu, cpus, gpus, message) -> None:
    with pytest.raises(TrainingError, match=message):
        plan_resources(workers, use_gpu, cpus, gpus, "this machine")


@pytest.mark.parametrize("workers,cpus,per_worker", [(1, 2, 2), (2, 2, 1), (2, 5, 2)])
def test_cpus_are_split_between_workers(workers: int, cpus: int, per_worker: int) -> None:
    assert plan_resources(workers, False, cpus, 0, "here") == per_worker


def test_the_noise_filter_drops_only_the_preemption_watcher_line() -> None:
    """Ray's line about the PreemptionWatcher actor goes; any other line, a core_worker.cc
    error included, passes whole and in order, and a flush passes a partial line."""
    import io

    from dltrain.train.rayenv import NoiseFilter

    noise = ("[2026-12-07 18:17:51,298 E 10608 10693] core_worker.cc:2465: Actor with class "
             "name: 'PreemptionWatcher' and ID: '60bd' has constructor arguments in the object "
             "store and max_restarts > 0. If the arguments in the object store go out of scope "
             "or are lost, the actor restart will fail. See "
             "https://github.com/ray-project/ray/issues/53727 for more details.")
    other = "[2026-12-07 18:17:52,000 E 10608 10693] core_worker.cc:99: Actor died: OOM"
    out = io.StringIO()
    stream = NoiseFilter(out)
    stream.write("epoch 1/2\n" + noise)
    stream.write("\n")
    stream.write(other + "\nepoch 2/2 ")
    assert out.getvalue() == f"epoch 1/2\n{other}\n"
    stream.flush()
    assert out.getvalue() == f"epoch 1/2\n{other}\nepoch 2/2 "


def test_run_key_follows_training_params_and_data_only() -> None:
    data_a = {"data_checksum": "raw-a", "train": {"sha256": "t"}, "val": {"sha256": "v"},
              "test": {"sha256": "e"}}
    base = run_key(params(), data_a)
    assert run_key(params(), data_a) == base
    assert run_key(params(max_failures=3, storage_path="/x"), data_a) == base
    assert run_key(params(epochs=3), data_a) != base
    assert run_key(params(), {**data_a, "data_checksum": "raw-b"}) != base
    assert run_key(params(), {**data_a, "val": {"sha256": "v2"}}) != base  # a re-split


def test_unwritable_storage_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TrainingError, match="train.storage_path .* is not writable"):
        check_storage(str(blocker / "sub"))


def test_too_many_workers_fail_before_ray_starts(processed_ws: Path, tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    with pytest.raises(TrainingError, match="lower train.num_workers"):
        train(params(num_workers=64, batch_size=64), ws)
    assert not ws.model_path.exists()
    import ray

    assert not ray.is_initialized()


def test_a_model_too_big_for_memory_is_a_config_error_before_ray_starts(
        processed_ws: Path, tmp_path: Path) -> None:
    """hidden_sizes [100000, 100000] (10 billion weights) cannot train here: the pre-flight
    estimate refuses it naming the key, before any Ray process starts (and so before any
    worker fails on it and is retried)."""
    ws = Workspace.at(tmp_path)
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    big = params_from_dict({"model": {"hidden_sizes": [100000, 100000]},
                            "train": {"epochs": 1, "batch_size": 32, "max_failures": 2}})
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"model.hidden_sizes \[100000, 100000\] is "
                       r"10,079,600,010 weights: at least \d+\.\d GiB .* available"):
        train(big, ws)
    assert time.monotonic() - started < 5
    import ray

    assert not ray.is_initialized()
    check_memory(params(), 2**30, "here")  # the default-sized model fits in 1 GiB


@pytest.mark.parametrize("how", ["read-only mount", "a file named models"])
def test_an_unwritable_models_dir_fails_before_ray_starts(processed_ws: Path, tmp_path: Path,
                                                          how: str) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    if how == "a file named models":
        ws.models_dir.write_text("not a directory")
    else:
        ws.models_dir.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                               str(ws.models_dir)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    try:
        with pytest.raises(NotWritableError, match=r"cannot write .*models/model.safetensors"):
            train(params(), ws)
    finally:
        if how == "read-only mount":
            subprocess.run(["umount", "-l", str(ws.models_dir)], check=False)
    import ray

    assert not ray.is_initialized()
    assert not ws.training_report_path.exists()


def test_changed_params_name_each_key_that_differs() -> None:
    assert changed_params(params(), params()) == []
    assert changed_params(params(), params(ray_address="local")) == []  # not the model's
    assert changed_params(params(epochs=5), params(epochs=2, learning_rate=0.5)) == [
        "train.epochs 5 -> 2", "train.learning_rate 0.001 -> 0.5"]


# ----------------------------------------------------------------------------- which Ray

def _listening() -> tuple[socket.socket, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, f"127.0.0.1:{sock.getsockname()[1]}"


def _warm_env(ws: Path, address: str) -> Path:
    (ws / ".ray").mkdir(parents=True, exist_ok=True)
    env_file = ws / ".ray" / "env"
    env_file.write_text(f"export RAY_ADDRESS={address}\nexport RAY_AUTH_MODE=token\n"
                        f"export RAY_AUTH_TOKEN_PATH={ws / '.ray' / 'auth_token'}\n")
    return env_file


def test_local_is_always_a_private_ray(tmp_path: Path) -> None:
    sock, address = _listening()
    with sock:
        _warm_env(tmp_path, address)
        target, note = resolve("local", Workspace.at(tmp_path), {"RAY_ADDRESS": address})
    assert target == RayTarget(None, "a private local Ray") and note is None


def test_auto_without_a_running_ray_is_a_private_one(tmp_path: Path) -> None:
    for mode in ("auto", None):
        target, note = resolve(mode, Workspace.at(tmp_path), {})
        assert target.local and note is None


def test_auto_takes_ray_address_first(tmp_path: Path) -> None:
    target, _ = resolve("auto", Workspace.at(tmp_path), {"RAY_ADDRESS": "10.0.0.9:6379"})
    assert target.address == "10.0.0.9:6379" and "(RAY_ADDRESS)" in target.where
    assert not target.on_this_machine


def test_auto_takes_the_workspace_warm_ray_with_its_token(tmp_path: Path) -> None:
    sock, address = _listening()
    with sock:
        _warm_env(tmp_path, address)
        target, note = resolve("auto", Workspace.at(tmp_path), {})
    assert note is None
    assert target.address == address and target.on_this_machine
    assert target.env == {"RAY_AUTH_MODE": "token",
                          "RAY_AUTH_TOKEN_PATH": str(tmp_path / ".ray" / "auth_token")}
    assert "make ray-up" in target.where


def test_a_warm_ray_that_does_not_answer_falls_back_to_a_private_one(tmp_path: Path) -> None:
    sock, address = _listening()
    sock.close()  # recorded, but gone
    _warm_env(tmp_path, address)
    target, note = resolve("auto", Workspace.at(tmp_path), {})
    assert target.local
    assert f"does not answer at {address}" in note and "make ray-up" in note


def test_an_address_is_that_cluster(tmp_path: Path) -> None:
    target, _ = resolve("ray://head:10001", Workspace.at(tmp_path), {"RAY_ADDRESS": "x:1"})
    assert target.address == "ray://head:10001" and "train.ray_address" in target.where


def test_the_env_file_format_of_make_ray_up(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("export RAY_ADDRESS=10.1.2.3:40001\nexport RAY_AUTH_MODE=token\n\n")
    assert read_env_file(path) == {"RAY_ADDRESS": "10.1.2.3:40001", "RAY_AUTH_MODE": "token"}


# ----------------------------------------------------------------------------- real Ray

@pytest.mark.integration
def test_the_console_of_a_ray_run_has_no_preemption_watcher_error(tmp_path: Path) -> None:
    """What a user reads of `dltrain train` on a worker group: the epochs, and no core_worker.cc
    line about Ray Train's PreemptionWatcher actor (dltrain.train.rayenv.KNOWN_NOISE)."""
    ws = make_processed(tmp_path)
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [32]},
        "train": {"epochs": 2, "batch_size": 32, "num_workers": 1, "ray_address": "local"}}))
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short socket paths
    try:
        run = subprocess.run([sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)],
                             env=venv_env(RAY_TMPDIR=str(ray_tmpdir)), capture_output=True,
                             text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console
    assert "epoch 2/2" in console  # the workers' own lines still come through Ray
    assert "trained 2 epochs" in run.stdout
    assert not [line for line in console.splitlines()
                if "core_worker.cc" in line and "PreemptionWatcher" in line], console


@pytest.mark.integration
def test_two_cpu_workers_train_checkpoint_and_report(processed_ws: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    # An interrupted run of this workspace on another split of the data: not resumed, and
    # the run says why.
    (ws.ray_results_dir / "dltrain-0123456789ab").mkdir(parents=True)
    (ws.ray_results_dir / "dltrain-last-run.json").write_text(json.dumps({
        "name": "dltrain-0123456789ab", "inputs": {"data": {"val": "another-split"}}}))
    # A short path of its own: Ray's socket paths must stay under ~107 bytes.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    try:
        report = train(params(num_workers=2, epochs=3, ray_address="local"), ws)
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    import ray

    assert not ray.is_initialized()  # the private Ray is stopped with the run
    assert ("starting fresh: the interrupted run dltrain-0123456789ab is not resumed"
            in capsys.readouterr().out)
    assert report["ray"]["where"] == "a private local Ray"
    assert report["world_size"] == 2
    assert len(report["nodes"]) == 2
    epochs = report["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val_accuracy"] >= 0.9
    assert report["samples_per_s"] > 0
    on_disk = json.loads(ws.training_report_path.read_text())
    assert on_disk["epochs"] == epochs
    for key in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                "epoch_time_s"):
        assert key in epochs[0]
    # Checkpoints landed in the storage path; the model loads as weights only.
    run_dir = Path(report["storage_path"]) / report["run_name"]
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    model, card = load_model(ws.model_path)
    assert card["world_size"] == 2 and card["architecture"]["hidden_sizes"] == [64]
    assert load_file(ws.model_path).keys() == model.state_dict().keys()


@pytest.fixture
def private_ray_tmpdir(monkeypatch: pytest.MonkeyPatch):
    # A short path of its own: Ray's socket paths must stay under ~107 bytes.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    yield ray_tmpdir
    shutil.rmtree(ray_tmpdir, ignore_errors=True)


@pytest.mark.integration
def test_a_non_finite_loss_stops_the_run_without_retries(processed_ws: Path, tmp_path: Path,
                                                         private_ray_tmpdir: Path) -> None:
    """learning_rate 1e30 diverges in epoch 1: one clear error naming the key, although
    train.max_failures allows 2 retries (a retry would only diverge again), and no model."""
    ws = Workspace.at(tmp_path)
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    diverging = params(learning_rate=1e30, optimizer="sgd", max_failures=2,
                       ray_address="local")
    with pytest.raises(CertainTrainingError,
                       match=r"^training stopped: the loss is not finite at epoch 1 .*lower "
                             r"train.learning_rate \(now 1e\+30\)") as caught:
        train(diverging, ws)
    assert "\n" not in str(caught.value)
    assert not ws.model_path.exists() and not ws.training_report_path.exists()
    summary = check_processed(ws.processed_dir, "fashion-mnist")
    run_dir = ws.ray_results_dir / f"dltrain-{run_key(diverging, summary)}"
    assert not list(run_dir.glob("epoch_*"))  # the diverged epoch was never reported
    assert not (run_dir / FAILURE_FILE).exists()  # read and removed by the driver
    # Ray Train never restarted the worker group: its controller logs each failure decision
    # (at every level) in its system log.
    controller_logs = list(private_ray_tmpdir.rglob("ray-train-sys-controller-*.log"))
    assert controller_logs
    logs = "".join(p.read_text(errors="replace") for p in controller_logs)
    assert "[FailurePolicy]" not in logs


def test_params_edited_while_training_runs_fail_without_outputs(
        processed_ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.epochs edited from 3 to 2 in params.yaml while the run trains: it fails naming
    the key and writes neither models/ nor reports/training.json (DVC would record them
    against epochs 2). In local mode: the check is the stage's, not Ray's."""
    import dltrain.train.storage as storage

    ws = Workspace.at(tmp_path)
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    ws.params_path.write_text("model:\n  hidden_sizes: [64]\ntrain:\n  epochs: 3\n"
                              "  batch_size: 32\n  num_workers: 0\n")
    started = load_params(ws.params_path)
    keep = storage.keep_checkpoint

    def edit_after_the_first_checkpoint(run_dir, epoch, save):
        kept = keep(run_dir, epoch, save)
        if epoch == 1:  # the run goes on with epochs 2 and 3
            ws.params_path.write_text(ws.params_path.read_text().replace(
                "epochs: 3", "epochs: 2"))
        return kept

    monkeypatch.setattr(storage, "keep_checkpoint", edit_after_the_first_checkpoint)
    with pytest.raises(TrainingError, match=r"params.yaml changed while training ran "
                       r"\(train.epochs 3 -> 2\).* re-run `dvc repro train`"):
        train(started, ws, reload=lambda: load_params(ws.params_path))
    assert list(ws.ray_results_dir.glob("dltrain-*/epoch_0003"))  # it trained to the end
    assert not ws.model_path.exists() and not ws.model_card_path.exists()
    assert not ws.training_report_path.exists()


def _train_workers(driver_pid: int) -> list[psutil.Process]:
    """The live Ray Train workers of the run driven by `driver_pid`: its private Ray's raylet is
    the driver's child and the workers are the raylet's, so another Ray on the machine (a
    user's, another test run's) is never touched."""
    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if (proc.status() != psutil.STATUS_ZOMBIE
                    and "RayTrainWorker" in " ".join(proc.cmdline())):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def _kill_a_worker_after(checkpoint: str, tmp_path: Path, max_failures: int
                        ) -> tuple[subprocess.CompletedProcess, Path]:
    """Run `dltrain train` (2 workers, 8 epochs) in a subprocess, SIGKILL one Ray Train worker
    once `checkpoint` exists in storage, and wait for the run to end."""
    ws = make_processed(tmp_path, n_train=12000, n_test=200)
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [256]},
        "train": {"epochs": 8, "batch_size": 32, "num_workers": 2,
                  "max_failures": max_failures}}))
    args = [sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)]
    proc = subprocess.Popen(args, env=venv_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((ws / ".ray_results").glob(f"*/{checkpoint}")):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, f"no {checkpoint} within 240 s"
            time.sleep(0.2)
        victims = _train_workers(proc.pid)
        assert victims, "no Ray Train worker process found"
        victims[-1].send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(args, proc.returncode, output), ws


@pytest.mark.integration
def test_killed_worker_resumes_from_the_latest_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a worker after a checkpoint: the run completes, resumed from the checkpoint."""
    done, ws = _kill_a_worker_after("epoch_0002", tmp_path, max_failures=2)
    assert done.returncode == 0, done.stdout
    report = json.loads((ws / "reports" / "training.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == list(range(1, 9))
    assert report["resumed"] is True
    # The epochs after the kill ran in a restored attempt; those before kept attempt 0.
    attempts = [e["attempt"] for e in report["epochs"]]
    assert attempts[0] == 0 and attempts[-1] >= 1 and attempts == sorted(attempts)
    assert report["epochs"][-1]["val_accuracy"] >= 0.9
    assert "resuming from the checkpoint of epoch" in done.stdout
    # Live tracking went on in the same MLflow run: one run, every epoch in it once.
    runs, history = training_runs(ws, report)
    assert runs == [report["mlflow"]["run_id"]]
    assert history == [(e["epoch"], pytest.approx(e["val_accuracy"])) for e in report["epochs"]]
    # Output that is not a terminal (a log, DVC's or Prefect's capture): a line at each step a
    # user waits on, in order, and no colour codes.
    # Only the orders the code makes: the driver's own lines, and each rank 0's lines (Ray
    # forwards every worker process' output on its own, so the first worker group's last
    # lines and the restored group's first ones arrive in either order).
    assert "\x1b[" not in done.stdout
    _in_order(done.stdout, "starting a private local Ray", "Ray ready in",
              "starting 2 Ray Train workers", "2 workers ready on 1 node")
    _in_order(done.stdout, "starting 2 Ray Train workers", "epoch 1/8  loss", "epoch 2/8  loss")
    _in_order(done.stdout, "starting 2 Ray Train workers",
              "resuming from the checkpoint of epoch", "epoch 8/8  loss")
    ready = [line for line in done.stdout.splitlines()
             if line.startswith("2 workers ready on 1 node")]
    assert len(ready) >= 2, done.stdout  # the first worker group's, and the restored one's
    assert "\ntrained 8 epochs in" in done.stdout


def _in_order(output: str, *starts: str) -> None:
    """Each of `starts` begins a line of `output`, in this order."""
    lines = output.splitlines()
    at = 0
    for start in starts:
        found = next((i for i in range(at, len(lines)) if lines[i].startswith(start)), None)
        assert found is not None, f"no line starting {start!r} after line {at}:\n{output}"
        at = found + 1


@pytest.mark.integration
def test_worker_failure_without_retries_fails_clearly(tmp_path: Path) -> None:
    done, ws = _kill_a_worker_after("epoch_0001", tmp_path, max_failures=0)
    assert done.returncode != 0
    assert "training failed after 0 allowed worker failure(s) (train.max_failures)" in done.stdout
    assert not (ws / "models" / "model.safetensors").exists()
    runs, _ = training_runs(ws, None)  # the MLflow run stays, marked failed
    assert [(r.info.status, r.data.tags["dltrain.training"]) for r in runs] == [
        ("FAILED", "failed")]


# ----------------------------------------------------------------------------- beside a user's Ray

@pytest.fixture
def users_ray(session_ray: Head) -> Head:
    """A `ray start --head` as a user runs one (the session's: on loopback, with token
    authentication; the tests beside it check that it is left alone): these tests are about
    not disturbing a running Ray, not about starting or stopping one."""
    return session_ray


def _train_cli(ws: Path, env: dict[str, str], *args: str, timeout: float = 600
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dltrain", "train", "--workspace", str(ws),
                           "-S", "train.epochs=1", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.integration
def test_the_default_trains_on_a_private_ray_beside_a_users_ray(
        users_ray: Head, processed_ws: Path, tmp_path: Path) -> None:
    """The collision that broke `dvc repro`: with a user's Ray found by a plain ray.init(),
    the default run starts a Ray of its own and leaves the user's one as it was."""
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    (tmp_path / "params.yaml").write_text(json.dumps({"model": {"hidden_sizes": [64]}}))
    before = users_ray.pids()
    env = venv_env(RAY_TMPDIR=str(users_ray.tmpdir))
    env.pop("RAY_ADDRESS", None)
    done = _train_cli(tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    # Output that is not a terminal: no colour codes, and the epoch line as the worker wrote
    # it, without Ray's "(RayTrainWorker pid=...)" prefix.
    assert "\x1b[" not in done.stdout + done.stderr
    assert any(line.startswith("epoch 1/1  loss") for line in done.stdout.splitlines()), \
        done.stdout
    report = json.loads((tmp_path / "reports" / "training.json").read_text())
    assert report["ray"]["where"] == "a private local Ray"
    assert report["nodes"] and users_ray.node_id not in report["nodes"]
    # The user's Ray: the same processes, still one node, still answering.
    assert users_ray.pids() >= before
    probe = subprocess.run([sys.executable, "-c", NODE_ID], capture_output=True, text=True,
                           timeout=180, env=users_ray.client_env(RAY_ADDRESS=users_ray.address))
    assert probe.stdout.split() == [users_ray.node_id, "1"], probe.stderr


@pytest.mark.integration
def test_auto_trains_on_the_running_warm_ray(users_ray: Head, processed_ws: Path,
                                             tmp_path: Path) -> None:
    """`auto` with the workspace's warm Ray recorded in .ray/env (what `make ray-up` writes):
    the run's worker is on that head's node, and the head keeps running after it."""
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    (tmp_path / "params.yaml").write_text(json.dumps({"model": {"hidden_sizes": [64]}}))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "env").write_text(
        f"export RAY_ADDRESS={users_ray.address}\nexport RAY_AUTH_MODE=token\n"
        f"export RAY_AUTH_TOKEN_PATH={users_ray.token_path}\n")
    env = venv_env()
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    done = _train_cli(tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "reports" / "training.json").read_text())
    assert report["nodes"] == [users_ray.node_id]
    assert "warm Ray" in report["ray"]["where"]
    assert f"connecting to the workspace's warm Ray at {users_ray.address}" in done.stdout
    assert users_ray.pids()


@pytest.mark.integration
@pytest.mark.parametrize("token", ["missing", "wrong"])
def test_a_cluster_that_refuses_the_token_is_one_line(users_ray: Head, tmp_path: Path,
                                                      processed_ws: Path, token: str) -> None:
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    (tmp_path / "params.yaml").write_text(json.dumps({"model": {"hidden_sizes": [64]}}))
    env = venv_env(RAY_ADDRESS=users_ray.address)
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    if token == "wrong":
        wrong = tmp_path / "token"
        wrong.write_text(secrets.token_hex(32))
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(wrong))
    done = _train_cli(tmp_path, env)
    assert done.returncode == 3, done.stdout + done.stderr
    errors = done.stderr.strip().splitlines()
    assert errors == [errors[0]] and errors[0].startswith(
        f"dltrain train: error: cannot use the Ray cluster at {users_ray.address} (RAY_ADDRESS)")
    assert "RAY_AUTH_TOKEN_PATH" in errors[0] and "Traceback" not in done.stdout
    assert not (tmp_path / "models").exists()


# ----------------------------------------------------------------------------- progress output

def test_rank_0_draws_a_progress_bar_on_the_drivers_terminal(capsys) -> None:
    """The driver's stdout a terminal and rank 0 on its Ray node: a tqdm bar of the epoch's
    batches on that terminal, cleared for the epoch's line, and nothing sent through Ray's
    line-by-line forwarding (stdout)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    from dltrain.train.worker import Output

    master, slave = pty.openpty()
    # 30 rows x 100 columns: a new pseudo-terminal has no size, and tqdm draws nothing in 0.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        out = Output.for_rank(0, {"tty": os.ttyname(slave), "node_id": "n1"}, "n1")
        start = out.epoch_bar(2)
        step = start(1, 40)
        for _ in range(40):
            step()
            time.sleep(0.01)
        out.line("epoch 1/2  loss 0.5")
        out.close()
        shown = b""
        while select.select([master], [], [], 0.5)[0]:
            shown += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    text = shown.decode()
    assert "epoch 1/2:" in text and "/40 [" in text and "\r" in text
    assert text.rstrip().endswith("epoch 1/2  loss 0.5")
    assert capsys.readouterr().out == ""


def test_off_a_terminal_or_on_another_node_there_are_lines_only(capsys) -> None:
    from dltrain.train.stage import _progress_terminal
    from dltrain.train.worker import Output

    assert _progress_terminal() is None  # pytest's captured stdout is no terminal
    for out in (Output.for_rank(0, None, "n1"), Output.for_rank(1, {"tty": "/dev/tty",
                                                                    "node_id": "n1"}, "n1"),
                Output.for_rank(0, {"tty": "/dev/tty", "node_id": "n1"}, "n2")):
        assert out.epoch_bar(2) is None
        out.line("epoch 1/2  loss 0.5")
        out.close()
    assert capsys.readouterr().out == "epoch 1/2  loss 0.5\n" * 3
