"""train.num_workers 0: Ray Train's local mode. The training function runs in the stage's own
process and no Ray starts, so the in-process tests here are cheap (unit tier); what Ray Train
does not do in local mode (checkpoints in the run directory, resume, the epoch log for live
tracking, the certain-failure record) the stage does, and these tests hold it to that."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from dltrain.config import params_from_dict
from dltrain.errors import CertainTrainingError, ConfigError, TrainingError
from dltrain.model.torchio import load_model
from dltrain.paths import Workspace
from dltrain.train.preflight import check_processed, run_key
from dltrain.train.stage import train
from dltrain.train.storage import FAILURE_FILE, read_epochs

from helpers.data import make_processed
from helpers.mlflow import seed_workspace_store, training_runs
from helpers.repo import venv_env

RAY_PROCESSES = ("raylet", "gcs_server", "RayTrainWorker", "ray::")


def params(**train_overrides):
    train_section = {"epochs": 3, "batch_size": 32, "num_workers": 0}
    train_section.update(train_overrides)
    return params_from_dict({"model": {"hidden_sizes": [64]}, "train": train_section})


def _workspace(processed_ws: Path, tmp_path: Path) -> Workspace:
    shutil.copytree(processed_ws / "data", tmp_path / "data")
    seed_workspace_store(tmp_path)
    return Workspace.at(tmp_path)


def _ray_children() -> list[str]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(name in line for name in RAY_PROCESSES):
            found.append(line)
    return found


def test_local_mode_trains_in_this_process_with_outputs_and_live_tracking(
        processed_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ws = _workspace(processed_ws, tmp_path)
    report = train(params(), ws)
    import ray

    assert not ray.is_initialized()  # no ray.init: no Ray of any kind
    assert _ray_children() == []
    out = capsys.readouterr().out
    assert "training fashion-mnist in this process (Ray Train local mode" in out
    assert [line[:9] for line in out.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]  # one progress line per epoch
    assert "Running in local mode" not in out and "Reported metrics" not in out
    # The outputs of a worker group's run, in the same form, saying where it ran.
    on_disk = json.loads(ws.training_report_path.read_text())
    assert on_disk == report
    assert report["mode"] == "local" and report["world_size"] == 1
    assert report["nodes"] == ["local"]
    assert report["ray"]["where"] == "this process (Ray Train local mode)"
    epochs = report["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert report["resumed"] is False
    model, card = load_model(ws.model_path)
    assert card["mode"] == "local" and card["world_size"] == 1
    assert load_file(ws.model_path).keys() == model.state_dict().keys()
    # Checkpoints in the run directory (the latest two), as Ray Train keeps them on a group.
    run_dir = Path(report["storage_path"]) / report["run_name"]
    assert sorted(p.name for p in run_dir.glob("epoch_*")) == ["epoch_0002", "epoch_0003"]
    assert (run_dir / "dltrain-complete.json").is_file()
    # Live tracking without Ray Train's callback: the training function wrote each epoch for
    # the tracking thread to send, and the MLflow run has every epoch once.
    assert read_epochs(report["storage_path"], report["run_name"]) == epochs
    runs, history = training_runs(ws.root, report)
    assert runs == [report["mlflow"]["run_id"]]
    assert history == [(e["epoch"], pytest.approx(e["val_accuracy"])) for e in epochs]
    assert report["mlflow"]["unsent_epochs"] is None


def test_one_epoch_is_said_in_the_singular(processed_ws: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLTRAIN_LIVE_TRACKING", "0")
    train(params(epochs=1), _workspace(processed_ws, tmp_path))
    out = capsys.readouterr().out
    assert ", 1 epoch, global batch" in out and "\ntrained 1 epoch in " in out, out
    assert "1 epochs" not in out, out


def test_a_non_finite_loss_stops_at_that_epoch(processed_ws: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLTRAIN_LIVE_TRACKING", "0")
    ws = _workspace(processed_ws, tmp_path)
    diverging = params(learning_rate=1e30, optimizer="sgd")
    with pytest.raises(CertainTrainingError,
                       match=r"^training stopped: the loss is not finite at epoch 1 .*lower "
                             r"train.learning_rate \(now 1e\+30\)"):
        train(diverging, ws)
    assert not ws.model_path.exists() and not ws.training_report_path.exists()
    summary = check_processed(ws.processed_dir, "fashion-mnist")
    run_dir = ws.ray_results_dir / f"dltrain-{run_key(diverging, summary)}"
    assert not list(run_dir.glob("epoch_*"))  # the diverged epoch was never kept
    assert not (run_dir / FAILURE_FILE).exists()  # read and removed by the stage


def test_an_error_in_training_is_one_line_without_retries(
        processed_ws: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLTRAIN_LIVE_TRACKING", "0")
    ws = _workspace(processed_ws, tmp_path)
    (ws.processed_dir / "val_labels.npy").write_bytes(b"not an array")
    with pytest.raises(TrainingError, match=r"^training failed \(local mode, no retries\): "):
        train(params(), ws)
    assert not ws.model_path.exists()


def test_local_mode_keeps_checkpoints_on_this_machine_only(processed_ws: Path,
                                                           tmp_path: Path) -> None:
    ws = _workspace(processed_ws, tmp_path)
    with pytest.raises(TrainingError, match=r"local mode \(train.num_workers 0\) keeps its "
                                            r"checkpoints on this machine"):
        train(params(storage_path="s3://bucket/runs"), ws)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_use_gpu_without_a_gpu_is_refused_before_training(processed_ws: Path,
                                                          tmp_path: Path) -> None:
    ws = _workspace(processed_ws, tmp_path)
    with pytest.raises(TrainingError, match="train.use_gpu is true, but PyTorch finds no CUDA"):
        train(params(use_gpu=True), ws)
    assert not ws.model_path.exists()


def test_zero_workers_take_any_global_batch() -> None:
    assert params(batch_size=100).train.num_workers == 0
    with pytest.raises(ConfigError, match=r"train.num_workers: -1; expected a value >= 0"):
        params(num_workers=-1)


# ----------------------------------------------------------------------------- subprocesses

@pytest.mark.integration
def test_a_killed_local_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """SIGKILL `dltrain train` (local mode) once epoch 1's checkpoint is kept: the re-run
    resumes after the latest kept epoch, and the run has every epoch, in MLflow once."""
    ws = make_processed(tmp_path, n_train=12000, n_test=200)
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [256]},
        "train": {"epochs": 6, "batch_size": 32, "num_workers": 0}}))
    args = [sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)]
    proc = subprocess.Popen(args, env=venv_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        first = []
        for line in proc.stdout:
            first.append(line)
            if line.startswith("epoch 1/6"):
                break
        deadline = time.monotonic() + 120
        while not list((ws / ".ray_results").glob("dltrain-*/epoch_[0-9]*")):
            assert proc.poll() is None, "".join(first) + proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (ws / "reports" / "training.json").exists()
    kept = max(int(p.name[6:]) for p in (ws / ".ray_results").glob("dltrain-*/epoch_*"))
    assert kept < 6, "the run ended before it was killed"

    done = subprocess.run(args, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "; resuming run dltrain-" in done.stdout
    assert f"resuming from the checkpoint of epoch {kept}: epoch {kept + 1} of 6" in done.stdout
    assert f"epoch {kept}/6" not in done.stdout  # the kept epochs are not trained again
    report = json.loads((ws / "reports" / "training.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert report["resumed"] is True
    attempts = [e["attempt"] for e in report["epochs"]]
    assert attempts == [0] * kept + [1] * (6 - kept)
    # The overhead is the re-run's wall time minus the epochs it trained, not minus the
    # killed run's epochs too (which once made it negative).
    own = sum(e["epoch_time_s"] for e in report["epochs"][kept:])
    assert report["ray_overhead_s"] == pytest.approx(report["wall_time_s"] - own)
    assert report["ray_overhead_s"] > 0
    runs, history = training_runs(ws, report)
    assert runs == [report["mlflow"]["run_id"]]
    assert history == [(e["epoch"], pytest.approx(e["val_accuracy"])) for e in report["epochs"]]


@pytest.mark.integration
def test_local_mode_trains_the_weights_of_a_one_worker_ray_run(
        processed_ws: Path, tmp_path: Path, session_ray) -> None:
    """The same function, seed and thread count: local mode and a 1-worker Ray Train run (on
    the session's running Ray, which the workspace's .ray/env names, as `make ray-up` leaves
    it) ship the same weights."""
    shipped = {}
    for workers in (0, 1):
        ws = _workspace(processed_ws, tmp_path / f"workers-{workers}")
        ws.params_path.write_text(json.dumps({
            "model": {"hidden_sizes": [64]},
            "train": {"epochs": 3, "batch_size": 32, "num_workers": workers,
                      "threads_per_worker": 1, "max_failures": 0, "ray_address": "auto"}}))
        session_ray.env_file(ws.root / ".ray")
        env = venv_env(DLTRAIN_LIVE_TRACKING="0")
        for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
                    "DLTRAIN_RAY_DIR"):
            env.pop(key, None)
        done = subprocess.run([sys.executable, "-m", "dltrain", "train", "--workspace",
                               str(ws.root)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        report = json.loads(ws.training_report_path.read_text())
        assert report["mode"] == ("local" if workers == 0 else "worker-group")
        if workers:
            assert report["nodes"] == [session_ray.node_id]  # the running Ray, not a new one
        shipped[workers] = (load_file(ws.model_path), report["epochs"])
    local, group = shipped[0], shipped[1]
    assert local[0].keys() == group[0].keys()
    for key in local[0]:
        assert torch.equal(local[0][key], group[0][key]), key
    assert ([e["train_loss"] for e in local[1]] == [e["train_loss"] for e in group[1]])
