"""The train stage: pre-flight checks, then Ray Train's TorchTrainer runs dltrain.train.loop on the
Ray that train.ray_address names (dltrain.train.connect), then the outputs.

train.num_workers 0 is Ray Train's local mode (ScalingConfig(num_workers=0)): the same training
function in this process, on the same ray.train API, with no Ray started (no ray.init, no
controller, no worker processes), for quick tries, `dvc exp` runs and tests. What Ray Train does
not do there, the stage does (dltrain.train.worker): the checkpoints in the run directory and
the resume from the latest, the epoch log for live tracking (RunConfig callbacks do not run),
the certain-failure record. It has no fault tolerance (FailureConfig is ignored): a crash ends
the run, and a re-run resumes it.

Ray Train traps, and how they are handled:
- report() is a barrier: every rank reports once per epoch; only rank 0 attaches a checkpoint.
- result.metrics is None unless a checkpoint was reported: every epoch reports one.
- Asking for more CPUs/GPUs than the cluster has makes Ray wait forever: checked up front.
- Workers change directory: every path handed to them is absolute.
- FailureConfig(max_failures=0) is Ray's default: train.max_failures turns recovery on, and a
  restarted worker group continues from the latest checkpoint (ray.train.get_checkpoint()).
- A re-run of the stage with the same params and data continues an interrupted run (Ray Train
  restores a run of the same name and storage path); a finished run is never continued, and
  `--resume never` always starts clean: never a mix of the two.
- fit() raises ray.train.TrainingFailedError: it becomes one line naming the failure.

The driver imports torch only through Ray Train's TorchTrainer, and does so in a thread while
ray.init waits for Ray's processes, so that on two cores the import costs the stage no wall time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib import import_module
from pathlib import Path
from typing import Any

from dltrain.atomic import check_writable
from dltrain.config import Params
from dltrain.errors import CertainTrainingError, DltrainError, TrainingError
from dltrain.paths import Workspace
from dltrain.train import connect, live, rayenv
from dltrain.train.liveproc import LiveProcess
from dltrain.train.loopconfig import LoopConfig
from dltrain.train.outputs import read_final_checkpoint, read_history, write_outputs
from dltrain.train.preflight import (
    available_memory,
    changed_params,
    check_memory,
    check_processed,
    fresh_reason,
    local_cpus,
    plan_resources,
    run_inputs,
    run_key,
)
from dltrain.train.storage import (
    check_storage,
    last_epoch,
    latest_checkpoint,
    local_run_dir,
    mark_complete,
    prepare_run_dir,
    read_failure,
    resolve_storage,
    swap_last_run,
)


def say(message: str) -> None:
    print(message, flush=True)


def plural(n: int, noun: str) -> str:
    """`1 epoch`, `3 epochs`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def train(params: Params, ws: Workspace, *, resume: str = "auto",
          reload: Callable[[], Params] | None = None) -> dict[str, Any]:
    """Train with Ray Train and write models/model.safetensors, models/model.json and
    reports/training.json; returns the training report.

    `reload()` reads the params again (params.yaml with the run's overrides): when the model or
    train params it gives differ at the end from those the run started with, nothing is
    written, since DVC would record the outputs against params they were not made with."""
    started = time.perf_counter()
    t = params.train
    summary = check_processed(ws.processed_dir, params.data.dataset)
    for output in (ws.model_path, ws.model_card_path, ws.training_report_path):
        check_writable(output)  # a read-only models/ now, not after the training
    if t.num_workers == 0:
        return _train_local(params, ws, summary, started, resume, reload)
    target, note = connect.resolve(t.ray_address, ws)
    if note:
        say(note)
    if target.local:  # before any Ray process starts (the GPUs are counted once Ray is up)
        plan_resources(t.num_workers, False, local_cpus(), 0, "this machine")
        check_memory(params, available_memory(), "this machine")
    storage = resolve_storage(t.storage_path, ws)
    check_storage(storage)
    # The processed splits, the model and the train params decide the run: a re-run resumes
    # only a run made of exactly these, and says why it does not resume another.
    name = f"dltrain-{run_key(params, summary)}"
    resuming = prepare_run_dir(storage, name, resume)
    reason = fresh_reason(swap_last_run(storage, name, run_inputs(params, summary)), name,
                          run_inputs(params, summary))
    if reason and not resuming:
        say(reason)

    connect.export_env(target)
    rayenv.set_driver_env()
    trainer_import = _import_in_background("ray.train.torch")
    say(f"starting {target.where} ({local_cpus()} CPUs)" if target.local
        else f"connecting to {target.where}")
    connect_s = connect.connect(target, local_cpus(), rayenv.runtime_env())
    import ray

    noise = rayenv.NoiseFilter.install()  # until ray.shutdown(): Ray prints through it
    tracker = None
    try:
        # The run's MLflow run opens now, from a thread of this process (dltrain.train.live).
        if live.enabled():
            tracker = live.LiveRun(params, ws, summary, storage=storage, name=name,
                                   say=say).start()
        cpus_per_worker = _plan(params, target)
        loop_cfg = _loop_config(params, ws, t.threads_per_worker or cpus_per_worker)
        say(f"Ray ready in {connect_s:.1f}s (Ray {ray.__version__}); training "
            f"{params.data.dataset}: {t.num_workers} worker(s) x {cpus_per_worker} CPU, "
            f"{'GPU' if t.use_gpu else 'CPU'}, {plural(t.epochs, 'epoch')}, "
            f"global batch {t.batch_size}"
            + (f"; resuming run {name} from its latest checkpoint" if resuming else ""))
        trainer_import.join()
        # The longest silent wait of a run: new processes each import PyTorch and join the
        # process group; rank 0 says "N workers ready" when they have (dltrain.train.worker).
        say(f"starting {t.num_workers} Ray Train worker{'s' if t.num_workers > 1 else ''} "
            "(each a new process that loads PyTorch)")
        # A private Ray ends with this process' ray.shutdown(), its workers with it; a warm
        # Ray or a cluster ends the job's actors (the Train controller, and the workers it
        # owns) when this driver disconnects.
        how = ("shutting down the private Ray and its Ray Train workers" if target.local
               else f"disconnecting from {target.where}, which ends this run's Ray Train "
                    "controller and workers")
        with _stop_on_signal(how, storage, name):
            result = _fit(params, loop_cfg, cpus_per_worker, storage, name,
                          _progress_terminal())
        report = _finish(params, ws, summary, result.checkpoint, result.metrics, started,
                         reload, tracker, mode="worker-group", world_size=t.num_workers,
                         name=name, storage=storage,
                         ray={"where": target.where, "version": ray.__version__,
                              "connect_s": round(connect_s, 3)},
                         # Ray Train restores a resumed run's checkpoint itself: which of its
                         # epochs an earlier driver trained is not known here.
                         trained_before=None if resuming else 0)
    except BaseException as exc:
        if tracker is not None:
            tracker.abort("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit))
                          else "FAILED")
        raise
    finally:
        # A private Ray stops here; a warm Ray or a cluster is only disconnected from.
        try:
            ray.shutdown()
        finally:
            noise.remove()
    _say_trained(report, ws, "Ray overhead")
    return report


def _train_local(params: Params, ws: Workspace, summary: dict[str, Any], started: float,
                 resume: str, reload: Callable[[], Params] | None) -> dict[str, Any]:
    """train() in Ray Train's local mode: this process trains; Ray is imported, never started."""
    t = params.train
    check_memory(params, available_memory(), "this machine")
    storage = resolve_storage(t.storage_path, ws)
    name = f"dltrain-{run_key(params, summary)}"
    run_dir = local_run_dir(storage, name)  # a URI is refused before anything is written
    check_storage(storage)
    resuming = prepare_run_dir(storage, name, resume)
    reason = fresh_reason(swap_last_run(storage, name, run_inputs(params, summary)), name,
                          run_inputs(params, summary))
    if reason and not resuming:
        say(reason)
    rayenv.set_driver_env()
    if t.use_gpu:  # refused before anything starts
        import torch

        if not torch.cuda.is_available():
            raise TrainingError("train.use_gpu is true, but PyTorch finds no CUDA GPU on this "
                                "machine (local mode, train.num_workers 0, trains on this "
                                "process' GPU); set train.use_gpu: false")
    tracker = None
    if live.enabled():
        # A child process imports MLflow and opens the run on the other core while this one
        # imports PyTorch and Ray Train (dltrain.train.liveproc).
        tracker = LiveProcess(params, ws, summary, storage=storage, name=name, say=say).start()
    try:
        return _train_in_process(params, ws, summary, started, reload, tracker, storage, name,
                                 run_dir, latest_checkpoint(run_dir) if resuming else None)
    except BaseException as exc:
        if tracker is not None:
            tracker.abort("KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit))
                          else "FAILED")
        raise


def _train_in_process(params: Params, ws: Workspace, summary: dict[str, Any], started: float,
                      reload: Callable[[], Params] | None, tracker: LiveProcess | None,
                      storage: str, name: str, run_dir: Path, resume_from: Path | None
                      ) -> dict[str, Any]:
    t = params.train
    import ray.train
    import ray.train.torch
    import torch

    # Ray Train logs local mode's start and every report() at INFO: the epoch lines say it.
    logging.getLogger("ray.train").setLevel(rayenv.RAY_TRAIN_LOG_LEVEL)
    # The training runs in this process' main thread: all of this machine's CPUs, unless
    # train.threads_per_worker says otherwise.
    threads = t.threads_per_worker or local_cpus()
    loop_cfg = _loop_config(params, ws, threads)
    say(f"training {params.data.dataset} in this process (Ray Train local mode, Ray "
        f"{ray.__version__}, PyTorch {torch.__version__.split('+')[0]}): {threads} "
        f"thread{'s' if threads > 1 else ''}, {'GPU' if t.use_gpu else 'CPU'}, "
        f"{plural(t.epochs, 'epoch')}, global batch {t.batch_size}"
        + (f"; resuming run {name} from its latest checkpoint" if resume_from else ""))
    # The epochs an earlier process trained, counted now: the run keeps its latest two
    # checkpoints only, so the one it resumes from may be gone by the end.
    trained_before = len(read_history(resume_from)) if resume_from else 0
    if tracker is not None:
        # The first epoch does not share the CPUs with MLflow's import (see live.OPEN_WAIT_S).
        tracker.wait_open()
    with _stop_on_signal("ending the training in this process", storage, name):
        result = _fit(params, loop_cfg, 0, storage, name, _progress_terminal(local=True),
                      local={"run_dir": str(run_dir),
                             "resume_from": str(resume_from) if resume_from else None})
    # No epoch left to train (the run was interrupted after its last checkpoint): the
    # checkpoint it resumed from is the final one.
    checkpoint = result.checkpoint or (
        ray.train.Checkpoint.from_directory(str(resume_from)) if resume_from else None)
    report = _finish(params, ws, summary, checkpoint, result.metrics, started, reload,
                     tracker, mode="local", world_size=1, name=name, storage=storage,
                     ray={"where": "this process (Ray Train local mode)",
                          "version": ray.__version__, "connect_s": 0.0},
                     trained_before=trained_before)
    _say_trained(report, ws, "overhead")
    return report


def _loop_config(params: Params, ws: Workspace, threads: int) -> LoopConfig:
    t = params.train
    return LoopConfig(processed_dir=str(ws.processed_dir.resolve()),
                      hidden_sizes=tuple(params.model.hidden_sizes), epochs=t.epochs,
                      batch_size=t.batch_size, learning_rate=t.learning_rate,
                      optimizer=t.optimizer, seed=t.seed, threads=threads,
                      ema_decay=t.ema_decay)


def _finish(params: Params, ws: Workspace, summary: dict[str, Any], checkpoint: Any,
            metrics: dict[str, Any] | None, started: float,
            reload: Callable[[], Params] | None, tracker: live.LiveRun | LiveProcess | None, *,
            mode: str, world_size: int, name: str, storage: str, ray: dict[str, Any],
            trained_before: int | None) -> dict[str, Any]:
    """The outputs, from the run's last checkpoint; the run marked complete."""
    t = params.train
    if checkpoint is None:
        raise TrainingError("training finished without a checkpoint")
    with checkpoint.as_directory() as directory:
        epochs, weights = read_final_checkpoint(Path(directory),
                                                tuple(params.model.hidden_sizes))
    metrics = metrics or {}
    if reload is not None:
        changed = changed_params(params, reload())
        if changed:
            raise TrainingError(
                f"params.yaml changed while training ran ({'; '.join(changed)}): the "
                "model was trained with the old values, so models/ and "
                "reports/training.json were not written; re-run `dvc repro train`")
    mlflow_run = tracker.finish(epochs) if tracker else None
    report = write_outputs(
        epochs, weights, params, ws, summary, mode=mode, world_size=world_size,
        device="cuda" if t.use_gpu else "cpu", nodes=list(metrics.get("nodes", [])),
        wall_s=time.perf_counter() - started, name=name, storage=storage, ray=ray,
        mlflow=mlflow_run, trained_before=trained_before)
    mark_complete(storage, name, report)
    return report


def _say_trained(report: dict[str, Any], ws: Workspace, overhead: str) -> None:
    best = next(e for e in report["epochs"] if e["epoch"] == report["best_epoch"])
    spent = report["ray_overhead_s"]
    say(f"trained {plural(len(report['epochs']), 'epoch')} in {report['wall_time_s']:.1f}s "
        f"({report['samples_per_s']:.0f} samples/s"
        + (f", {overhead} {spent:.1f}s" if spent is not None else "")
        + f"); best val_acc {best['val_accuracy']:.4f} at epoch "
        f"{best['epoch']}; wrote {ws.model_path.relative_to(ws.root)}")


def _plan(params: Params, target: connect.RayTarget) -> int:
    """CPUs per worker, checked against the Ray the run is on."""
    import ray

    t = params.train
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    where = "this machine" if target.local else target.where
    if target.on_this_machine:
        per_worker = plan_resources(t.num_workers, t.use_gpu, cpus, gpus, where)
    else:
        # On a cluster each worker takes threads_per_worker CPUs (default 1) wherever the
        # placement strategy puts it; the check counts the whole cluster.
        per_worker = t.threads_per_worker or 1
        plan_resources(t.num_workers * per_worker, t.use_gpu, cpus, gpus, where)
        if resources.get("memory"):  # the whole cluster's: a model over it cannot train
            check_memory(params, int(resources["memory"]), where)
    free = ray.available_resources().get("CPU", 0.0)
    if free < t.num_workers * per_worker:
        say(f"note: {where} has {free:g} of its {cpus:g} CPUs free; the run waits until "
            f"{t.num_workers * per_worker} are (another job is using them)")
    return per_worker


def _progress_terminal(local: bool = False) -> dict[str, str] | None:
    """The terminal that this process' stdout is, and this process' Ray node (LOCAL_NODE in
    local mode): rank 0 draws its progress bar there when it runs on that node
    (dltrain.train.worker.Output). None off a terminal: lines only, no escape codes."""
    if not sys.stdout.isatty():
        return None
    try:
        tty = os.ttyname(sys.stdout.fileno())
    except OSError:
        return None
    if local:
        from dltrain.train.worker import LOCAL_NODE

        return {"tty": tty, "node_id": LOCAL_NODE}
    import ray

    return {"tty": tty, "node_id": ray.get_runtime_context().get_node_id()}


def _fit(params: Params, loop_cfg: LoopConfig, cpus_per_worker: int, storage: str,
         name: str, progress: dict[str, str] | None = None,
         local: dict[str, str | None] | None = None) -> Any:
    """TorchTrainer.fit() with a certain failure as CertainTrainingError. `local` (the run
    directory and the checkpoint to resume from) runs Ray Train's local mode."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from dltrain.train.epochlog import EpochLog
    from dltrain.train.storage import KEEP_CHECKPOINTS
    from dltrain.train.worker import train_fn_per_worker

    t = params.train
    config = {"loop": asdict(loop_cfg), "use_gpu": t.use_gpu, "progress": progress,
              "storage": storage, "name": name}
    if local is not None:
        trainer = TorchTrainer(
            train_fn_per_worker, train_loop_config={**config, "local": True, **local},
            scaling_config=ray.train.ScalingConfig(num_workers=0, use_gpu=t.use_gpu),
            run_config=ray.train.RunConfig(name=name, storage_path=storage))
    else:
        trainer = TorchTrainer(
            train_fn_per_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu,
                resources_per_worker={"CPU": cpus_per_worker},
                placement_strategy=t.placement_strategy),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
                # Each committed epoch into the run directory, for live tracking to send.
                callbacks=[EpochLog(storage, name)],
                logging_config=ray.train.LoggingConfig(
                    log_level=rayenv.RAY_TRAIN_LOG_LEVEL)))
    read_failure(storage, name, remove=True)  # one of an earlier attempt of this run
    try:
        result = trainer.fit() if local is not None else _in_thread(trainer.fit)
    except ray.train.TrainingFailedError as exc:
        certain = read_failure(storage, name, remove=True)
        if certain:
            raise CertainTrainingError(f"training stopped: {certain}") from exc
        raise TrainingError(f"training failed after {t.max_failures} allowed worker "
                            f"failure(s) (train.max_failures): {_root_cause(exc)}") from exc
    except DltrainError:
        raise
    except Exception as exc:
        if local is None:
            raise
        # Local mode raises the training function's own error, at once (no retries): one
        # line, as a worker group's failure is.
        raise TrainingError(f"training failed (local mode, no retries): "
                            f"{_root_cause(exc)}") from exc
    # A worker that met a certain failure records it and ends (dltrain.train.worker), so that
    # Ray Train does not retry it: the run "finished", the failure is here.
    certain = read_failure(storage, name, remove=True)
    if certain:
        raise CertainTrainingError(f"training stopped: {certain}")
    return result


# Ctrl-C (SIGINT, to the terminal's foreground group) and a process manager's SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_on_signal(how: str, storage: str, name: str) -> Iterator[None]:
    """While the block trains, SIGINT or SIGTERM prints one line at once, "stopping: " `how`
    and where a re-run resumes, then raises KeyboardInterrupt in the main thread: train()
    marks the MLflow run interrupted and ends Ray, and the CLI says "interrupted". The
    checkpoints stay for the re-run. A second signal gets the handler that was there before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def stop(signum: int, frame: Any) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            epoch = last_epoch(storage, name)
        except Exception:  # noqa: BLE001  (the line must come, with or without the epoch)
            epoch = None
        # An epoch's file is written after its checkpoint is kept: the epoch named is the
        # latest that a re-run is sure to find, and a later one may have been kept.
        resume = "a re-run with the same params continues from its latest checkpoint"
        resume += (f" (epoch {epoch} or later)" if epoch else
                   " (none recorded yet: then it starts at epoch 1)" if epoch == 0 else "")
        say(f"stopping ({signal.Signals(signum).name}): {how}; {resume}")
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if signal.getsignal(sig) is stop:
                signal.signal(sig, handler)


def _in_thread(fit: Callable[[], Any]) -> Any:
    """fit() in a thread of its own, waited for by the main thread, which stays free to handle
    a signal at once (_stop_on_signal). In the main thread, Ray Train's fit() installs its own
    SIGINT handler, which asks the Train controller to abort and waits for its answer: the
    controller answers only once it is free, after the worker group has started, say. Off
    the main thread Ray Train installs none."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as exc:  # noqa: BLE001  (raised again in the main thread)
            outcome["error"] = exc

    # A daemon: an interrupted driver exits without waiting for Ray's answer.
    thread = threading.Thread(target=run, name="dltrain-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    cause = exc.__cause__ or exc.__context__
    detail = _root_cause(cause) if cause is not None else ""
    head = text[-1] if text else type(exc).__name__
    return f"{head} ({detail})" if detail and detail not in head else head


def _import_in_background(*modules: str) -> threading.Thread:
    """Import `modules` in a thread; a failure shows again where they are imported for use."""
    def load() -> None:
        for module in modules:
            try:
                import_module(module)
            except Exception:  # noqa: BLE001  (re-raised by the import that needs it)
                return

    thread = threading.Thread(target=load, name="dltrain-imports", daemon=True)
    thread.start()
    return thread
