"""The train stage: pre-flight checks, and real Ray Train runs on a local Ray."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import torch

from dltrain.config import params_from_dict
from dltrain.errors import TrainingError
from dltrain.modelio import load_model
from dltrain.paths import Workspace
from dltrain.train import check_processed, check_storage, plan_resources, run_key, train

from conftest import make_processed, venv_env


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


def test_run_key_follows_training_params_and_data_only() -> None:
    base = run_key(params(), "data-a")
    assert run_key(params(), "data-a") == base
    assert run_key(params(max_failures=3, storage_path="/x"), "data-a") == base
    assert run_key(params(epochs=3), "data-a") != base
    assert run_key(params(), "data-b") != base


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


# ----------------------------------------------------------------------------- real Ray

def _actor_processes(ray_tmpdir: Path) -> list[tuple[str, float]]:
    """(class, seconds its process waited idle before becoming the actor) of every actor the
    local Ray ran, from its session's logs: each worker process writes `:actor_name:<class>`
    into its worker-<id>-*.out file when it becomes an actor, and its
    python-core-worker-<id>_*.log has timestamped lines from its start to "Creating actor"."""
    def stamp(line: str) -> float:  # "[2026-11-29 14:32:25,815 I ..."
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    actors = []
    for out in ray_tmpdir.glob("ray/session_2*/logs/worker-*.out"):
        names = [line.split(":actor_name:", 1)[1].strip()
                 for line in out.read_text(errors="replace").splitlines()
                 if line.startswith(":actor_name:")]
        if not names:  # a process that ran tasks only, or none
            continue
        worker_id = out.name.split("-")[1]
        (core_log,) = out.parent.glob(f"python-core-worker-{worker_id}_*.log")
        lines = core_log.read_text(errors="replace").splitlines()
        created = next(line for line in lines if "Creating actor" in line)
        actors += [(name, stamp(created) - stamp(lines[0])) for name in names]
    return sorted(actors)


def test_the_controller_side_of_the_run_needs_no_torch() -> None:
    """What the Train controller unpickles and runs (the backend config, the callbacks that use
    it, the scaling policy) and what the driver builds the trainer from import no torch: the
    controller, which every worker waits for, no longer pays ~1.5 s for it (raybackend)."""
    code = """
import pickle, sys
import ray.cloudpickle as cloudpickle
from ray.train.v2._internal.callbacks.accelerators import AcceleratorSetupCallback
from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback
from ray.train.v2._internal.execution.controller.controller import TrainController
from ray.train.v2.api.config import ScalingConfig
from dltrain.raybackend import TorchBackendConfig
from dltrain.raypolicy import StaticScalingPolicy
import dltrain.train
config = TorchBackendConfig()
blob = cloudpickle.dumps([BackendSetupCallback(config), AcceleratorSetupCallback(config,
    ScalingConfig(num_workers=2)), StaticScalingPolicy(scaling_config=ScalingConfig())])
pickle.loads(blob)
assert config.backend_cls.__name__ == "TorchProcessGroupBackend"
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=venv_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.integration
def test_the_driver_never_imports_torch(processed_ws: Path, tmp_path: Path) -> None:
    """Only the workers import torch: the driver (the `dltrain train` process) installs the
    model bytes rank 0 serialised, so ray.init never competes with a torch import."""
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    (tmp_path / "params.yaml").write_text(json.dumps({"model": {"hidden_sizes": [64]}}))
    code = ("import sys; from dltrain.cli import main; "
            f"rc = main(['train', '--workspace', {str(tmp_path)!r}, '-S', 'train.epochs=1']); "
            "print('exit', rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=venv_env())
    assert out.stdout.strip().splitlines()[-1] == "exit 0 False", out.stdout + out.stderr
    model, card = load_model(tmp_path / "models" / "model.pt")
    assert card["best_epoch"] == 1 and model(torch.zeros(1, 784)).shape == (1, 10)


@pytest.mark.integration
def test_two_cpu_workers_train_checkpoint_and_report(processed_ws: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    # A short path of its own: Ray's socket paths must stay under ~107 bytes.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmpdir))
    try:
        report = train(params(num_workers=2, epochs=3), ws)
        actors = _actor_processes(ray_tmpdir)
        logs = {path.name for path in ray_tmpdir.glob("ray/session_2*/logs/*")}
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
    # Only the controller, its barrier and the workers: none of the helper actors Ray Train
    # would start one after the other for Ray Data, an autoscaler or placement-group cleanup.
    assert [name for name, _ in actors] == ["RayTrainWorker", "RayTrainWorker",
                                            "SynchronizationActor", "TrainController"]
    # A worker ran in a process that Ray had started before the controller asked for it
    # (train._prestart_workers; Ray 2.60 leaves one such process idle, whatever the count): it
    # waited idle while the controller started. A process started on demand becomes its actor
    # within milliseconds, as the controller's does.
    waited = [idle for name, idle in actors if name == "RayTrainWorker"]
    assert max(waited) > 0.5 > dict(actors)["TrainController"], actors
    # Nor the cluster services a one-run Ray has no use for (train._stage_services_only).
    assert "raylet.out" in logs and "log_monitor.log" in logs
    assert not {"monitor.log", "dashboard.log"} & logs, sorted(logs)

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
    assert torch.load(ws.model_path, weights_only=True).keys() == model.state_dict().keys()


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline:
            found.append(proc)
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
        victims = _train_workers()
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


@pytest.mark.integration
def test_worker_failure_without_retries_fails_clearly(tmp_path: Path) -> None:
    done, ws = _kill_a_worker_after("epoch_0001", tmp_path, max_failures=0)
    assert done.returncode != 0
    assert "training failed after 0 allowed worker failure(s) (train.max_failures)" in done.stdout
    assert not (ws / "models" / "model.pt").exists()
