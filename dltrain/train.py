"""The train stage: the MLP trained data-parallel with Ray Train V2 (DDP over a torch process
group: TorchTrainer's backend, without torch outside the workers; dltrain/raybackend.py).

Every Ray call of the project lives here (and in the cluster helpers); the loop itself is plain
PyTorch in dltrain/loop.py. Known Ray Train traps and how they are handled:
- report() is a barrier: every rank reports once per epoch; only rank 0 attaches a checkpoint.
- Asking for more CPUs/GPUs than the cluster has makes Ray wait forever: checked up front.
- Workers change directory: every path handed to them is absolute.
- FailureConfig(max_failures=0) is Ray's default: train.max_failures turns recovery on, and a
  restarted worker group continues from the latest checkpoint (ray.train.get_checkpoint()).
- A re-run of the stage with the same params and data continues an interrupted run (Ray Train
  V2 restores a run of the same name and storage path); a finished run is never continued,
  and `--resume never` always starts clean: never a mix of the two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from importlib import import_module
from pathlib import Path
from typing import Any

from dltrain.config import Params
from dltrain.errors import TrainingError
from dltrain.io import read_json, write_json
from dltrain.loopspec import CHECKPOINT_HISTORY, CHECKPOINT_MODEL, LoopConfig, best_epoch
from dltrain.paths import Workspace
from dltrain.preprocess import split_paths
from dltrain.rayenv import PRELOAD_ENV, RAY_QUIET_ENV, quiet_worker, runtime_env, wait_for_preload

COMPLETE_MARKER = "dltrain-complete.json"
# Only the Train workers import torch; their setup hook starts on it at once (rayenv).
WORKER_RUNTIME_ENV = {"env_vars": {PRELOAD_ENV: "1"}}
log = logging.getLogger("dltrain.train")


# --------------------------------------------------------------------------- pre-flight

def check_processed(processed_dir: Path, dataset: str) -> dict[str, Any]:
    """The processed data exists and is of the configured data set; returns its summary."""
    summary_path = processed_dir / "summary.json"
    if not summary_path.is_file():
        raise TrainingError(f"processed data not found: {summary_path} is missing "
                            "(run `dltrain preprocess` or `dvc repro preprocess` first)")
    summary = read_json(summary_path)
    if summary.get("dataset") != dataset:
        raise TrainingError(f"processed data in {processed_dir} is {summary.get('dataset')!r}, "
                            f"but data.dataset is {dataset!r}; re-run download and preprocess "
                            "(`dvc repro preprocess`)")
    for split in ("train", "val"):
        for path in split_paths(processed_dir, split):
            if not path.is_file():
                raise TrainingError(f"processed data incomplete: {path.name} missing in "
                                    f"{processed_dir}; re-run `dvc repro preprocess`")
    return summary


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def plan_resources(num_workers: int, use_gpu: bool, cpus: float, gpus: float,
                   where: str) -> int:
    """CPUs per worker; a clear error when the workers cannot all be placed (Ray would
    otherwise wait forever for resources that never come)."""
    if num_workers > cpus:
        raise TrainingError(f"train.num_workers is {num_workers}, but {where} has only "
                            f"{cpus:g} CPUs; lower train.num_workers to at most {int(cpus)}")
    if use_gpu and num_workers > gpus:
        have = f"only {gpus:g} GPUs" if gpus else "no GPU"
        raise TrainingError(f"train.use_gpu is true with {num_workers} workers, but {where} has "
                            f"{have}; set train.use_gpu: false or lower train.num_workers")
    return max(1, int(cpus // num_workers))


def run_key(params: Params, data_checksum: str) -> str:
    """Identifies a training run: same params and data -> same key -> resumable."""
    blob = json.dumps({"model": params.to_dict()["model"], "train": {
        k: v for k, v in params.to_dict()["train"].items()
        if k not in ("ray_address", "storage_path", "max_failures")}, "data": data_checksum},
        sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# --------------------------------------------------------------------------- storage

def resolve_storage(storage_path: str | None, ws: Workspace) -> str:
    """An absolute local path or a URI (s3://, gs://) that every worker can reach."""
    if storage_path is None:
        return str(ws.ray_results_dir)
    if "://" in storage_path:
        return storage_path
    path = Path(storage_path)
    return str(path if path.is_absolute() else (ws.root / path).resolve())


def _filesystem(storage: str):
    import pyarrow.fs

    if "://" in storage:
        try:
            return pyarrow.fs.FileSystem.from_uri(storage)
        except Exception as exc:  # pyarrow raises several types for bad URIs/credentials
            raise TrainingError(f"train.storage_path {storage!r} cannot be used: {exc}") from exc
    return pyarrow.fs.LocalFileSystem(), storage


def check_storage(storage: str) -> None:
    """Write and remove a marker file, so a bad storage path fails before training starts."""
    fs, root = _filesystem(storage)
    probe = f"{root.rstrip('/')}/.dltrain-storage-check-{os.getpid()}"
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as fh:
            fh.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:
        raise TrainingError(f"train.storage_path {storage!r} is not writable: {exc}; "
                            "on a cluster it must be shared storage every node can write "
                            "(an NFS path or s3://...)") from exc


def prepare_run_dir(storage: str, name: str, resume: str) -> bool:
    """Clear a finished (or, with resume='never', any) earlier run of this name.

    Returns True when an interrupted run will be continued from its checkpoints."""
    fs, root = _filesystem(storage)
    import pyarrow.fs

    run_dir = f"{root.rstrip('/')}/{name}"
    info = fs.get_file_info(run_dir)
    if info.type == pyarrow.fs.FileType.NotFound:
        return False
    complete = fs.get_file_info(f"{run_dir}/{COMPLETE_MARKER}").type != pyarrow.fs.FileType.NotFound
    if complete or resume == "never":
        fs.delete_dir(run_dir)
        return False
    return True


def mark_complete(storage: str, name: str, report: dict[str, Any]) -> None:
    fs, root = _filesystem(storage)
    with fs.open_output_stream(f"{root.rstrip('/')}/{name}/{COMPLETE_MARKER}") as fh:
        fh.write(json.dumps({"finished_at": time.time(),
                             "epochs": len(report["epochs"])}).encode())


# --------------------------------------------------------------------------- Ray

def start_ray(address: str | None, cpus: int) -> bool:
    """Connect to a cluster or start a local Ray; returns True if it started a local one."""
    for key, value in RAY_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    quiet_worker()
    if ray.is_initialized():
        return False
    common = {"runtime_env": runtime_env(), "logging_level": logging.WARNING,
              "log_to_driver": True}
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise TrainingError(f"cannot connect to the Ray cluster at {address!r} "
                                f"(train.ray_address / RAY_ADDRESS): {exc}") from exc
        return False
    # The dashboard is off: on a small machine it costs seconds of start-up and a core's worth
    # of CPU, and nothing in the pipeline needs it (`make cluster-up` starts one with it).
    # No pre-started workers: Ray starts them for tasks without a runtime_env, and every
    # process of a Train run has one, so they would only compete for the CPUs at start-up
    # (_prestart_worker starts the one that helps). Idle processes live a minute, not one
    # second: long enough for that one to wait for its actor. No metrics collection: nothing
    # scrapes a one-run Ray, and the raylet's wait for its metrics exporter made ray.init
    # take 3.0 s instead of 2.6 s (median of 6 on two cores).
    with _stage_services_only():
        ray.init(num_cpus=cpus, include_dashboard=False,
                 _system_config={"enable_worker_prestart": False,
                                 "prestart_worker_first_driver": False,
                                 "idle_worker_killing_time_threshold_ms": 60_000,
                                 "enable_metrics_collection": False}, **common)
    return True


@contextlib.contextmanager
def _stage_services_only() -> Iterator[None]:
    """ray.init of a local Ray also starts the autoscaler's monitor and the dashboard's API
    server (a minimal one with include_dashboard=False, still an HTTP server): two Python
    processes that import all of Ray (~1 s of CPU each, while the stage waits on two cores),
    and the monitor holds ray.shutdown up for another second. Only a long-lived cluster has a
    use for them (`ray status`, job submission, the state API); the stage's Ray lives for one
    run, so it starts without them (Ray 2.60's Node methods, pinned in pyproject.toml; checked
    by tests/test_train.py)."""
    from ray._private.node import Node

    saved = Node.start_monitor, Node.start_api_server
    Node.start_monitor = lambda self: None
    Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        Node.start_monitor, Node.start_api_server = saved


def _train_fn_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker: the plain loop, with Ray's DDP, all-reduce and report."""
    wait_for_preload()
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from dltrain.loop import (
        EpochRecord,
        LoopConfig,
        format_epoch,
        load_state,
        save_state,
        train_loop,
    )

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = LoopConfig(**config["loop"])
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    node_id = ray.get_runtime_context().get_node_id()
    nodes = [node_id]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, node_id)

    def allreduce(t: torch.Tensor) -> torch.Tensor:
        if world == 1:
            return t
        moved = t.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(moved)
        return moved.cpu()

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        # One gradient bucket: the whole MLP is 1.6 MB, so a single all-reduce per step beats
        # several small ones on a CPU with no core spare to overlap them.
        return ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"bucket_cap_mb": 64,
                                             "gradient_as_bucket_view": True})

    restored = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restored = load_state(Path(directory))
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {restored.history[-1]['epoch']}",
                  flush=True)

    def on_epoch_end(record: EpochRecord, snapshot) -> None:
        metrics = {**asdict(record), "nodes": nodes}
        if rank != 0:
            ray.train.report(metrics)
            return
        print(format_epoch(record, cfg.epochs), flush=True)
        with tempfile.TemporaryDirectory() as directory:
            save_state(snapshot(), Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch_{record.epoch:04d}")

    train_loop(cfg, rank=rank, world_size=world, device=device, wrap_model=wrap,
               allreduce=allreduce, restored=restored, on_epoch_end=on_epoch_end)


def _cluster_resources() -> tuple[float, float]:
    import ray

    resources = ray.cluster_resources()
    return resources.get("CPU", 0.0), resources.get("GPU", 0.0)


def _prestart_worker() -> None:
    """Have Ray start a Train worker's process now, while the controller starts.

    Ray Train starts its worker processes only once its controller is up, and a worker's first
    use of torch costs it ~3 s (torch, then torch._dynamo, which torch.optim imports): on two
    cores, seconds with one core idle. Ray 2.60 places an actor in an idle process of the same
    runtime env when it has one (never in a process that has run a task), and for the first
    task in a runtime env starts, next to the process that runs it, one more that waits idle.
    So a no-op task in exactly the runtime env Ray Train gives its workers (the controller's
    env vars plus worker_runtime_env's) leaves an idle process that the first worker actor is
    placed in, its setup hook having been importing torch meanwhile (rayenv.PRELOAD_ENV); the
    process that ran the task does not import it (rayenv.mark_task_process). Further workers,
    or the workers of a later Ray that places them elsewhere, start as before.
    tests/test_train.py checks that a worker ran in a process that had waited idle."""
    import ray
    from ray.train.v2._internal.constants import (
        DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE,
        RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
        get_env_vars_to_propagate,
    )

    from dltrain.rayenv import mark_task_process

    # DataParallelTrainer._initialize_and_run_controller's env, then WorkerGroup's.
    env = get_env_vars_to_propagate()
    env.setdefault(RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_ENV_VAR,
                   DEFAULT_RAY_WARN_BLOCKING_GET_INSIDE_ASYNC_VALUE)
    env.update(WORKER_RUNTIME_ENV["env_vars"])
    task = ray.remote(num_cpus=0, max_retries=0, runtime_env={"env_vars": env})
    task(mark_task_process).remote()  # nothing waits for it: the idle process is the point


def _trainer_class(local: bool) -> type:
    """Ray Train V2's data-parallel trainer with a torch backend (what TorchTrainer is), less
    the torch import in the controller (dltrain.raybackend) and less the helper actors this run
    has no use for.

    Ray 2.60 gives each helper actor a process of its own (~2 s of CPU on two cores): on a
    local Ray an autoscaling coordinator (see raypolicy.StaticScalingPolicy) and a placement-
    group cleaner (it frees the workers' resources if the controller dies; a local Ray dies
    with the driver and frees everything), started one after the other before the workers may
    start; and everywhere a DatasetManager for Ray Data shards, started while the first epoch
    runs (this loop reads memory-mapped arrays, no Ray Data). BENCHMARKS.md has the figures;
    tests/test_train.py checks which actors a run starts."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from dltrain.raypolicy import StaticScalingPolicy

    unused = (DatasetsCallback, PlacementGroupCleanerCallback) if local else (DatasetsCallback,)

    class LeanTorchTrainer(DataParallelTrainer):
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            kwargs["callbacks"] = [cb for cb in kwargs["callbacks"]
                                   if not isinstance(cb, unused)]
            if local and not self.scaling_config.elasticity_enabled:
                kwargs["scaling_policy"] = StaticScalingPolicy(scaling_config=self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return LeanTorchTrainer


def _fit(params: Params, loop_cfg: LoopConfig, cpus_per_worker: int, storage: str,
         name: str, local: bool) -> Any:
    import ray.train

    from dltrain.raybackend import TorchBackendConfig

    t = params.train
    trainer = _trainer_class(local)(
        _train_fn_per_worker,
        train_loop_config={"loop": asdict(loop_cfg), "use_gpu": t.use_gpu},
        backend_config=TorchBackendConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            worker_runtime_env=WORKER_RUNTIME_ENV,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training failed after {t.max_failures} allowed worker "
                            f"failure(s) (train.max_failures): {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    cause = exc.__cause__ or exc.__context__
    detail = _root_cause(cause) if cause is not None else ""
    head = text[-1] if text else type(exc).__name__
    return f"{head} ({detail})" if detail and detail not in head else head


# --------------------------------------------------------------------------- outputs

def read_final_checkpoint(directory: Path, hidden_sizes: tuple[int, ...]
                          ) -> tuple[list[dict[str, Any]], bytes]:
    """The epochs so far and the model.pt bytes (the best epoch's weights, serialised by rank
    0) of the run's last checkpoint, checked to be plain weights of the configured shapes."""
    from dltrain.weights import expected_shapes, parse_state_dict

    model_file = directory / CHECKPOINT_MODEL
    if not model_file.is_file():
        raise TrainingError(f"the run's last checkpoint ({directory}) has no {CHECKPOINT_MODEL}: "
                            "it was written by an older dltrain; re-run with `--resume never`")
    weights = model_file.read_bytes()
    shapes = {k: v.shape for k, v in parse_state_dict(weights, model_file).items()}
    if shapes != expected_shapes(hidden_sizes):
        raise TrainingError(f"{model_file} holds tensors {shapes}, not the MLP of "
                            f"model.hidden_sizes {list(hidden_sizes)}")
    return json.loads((directory / CHECKPOINT_HISTORY).read_text()), weights


def write_outputs(epochs: list[dict[str, Any]], weights: bytes, params: Params, ws: Workspace,
                  summary: dict[str, Any], *, world_size: int, device: str, nodes: list[str],
                  wall_s: float, name: str, storage: str) -> dict[str, Any]:
    """models/model.pt (`weights`) with its card, and reports/training.json."""
    from dltrain.weights import architecture, write_model_pair

    best_epoch_number = best_epoch(epochs)
    best = next(e for e in epochs if e["epoch"] == best_epoch_number)
    times = sorted(e["epoch_time_s"] for e in epochs)
    median = times[len(times) // 2]
    report = {
        "epochs": epochs,
        "world_size": world_size,
        "nodes": nodes,
        "device": device,
        "samples_per_s": epochs[-1]["samples"] / median if median else None,
        "wall_time_s": wall_s,
        "ray_overhead_s": wall_s - sum(e["epoch_time_s"] for e in epochs),
        "resumed": any(e.get("attempt", 0) for e in epochs),
        # models/model.pt holds the weights of this epoch (best validation accuracy).
        "best_epoch": best_epoch_number,
        "run_name": name,
        "storage_path": storage,
    }
    card = {
        "architecture": architecture(params.model.hidden_sizes),
        "params": params.to_dict(),
        "data": {"dataset": summary["dataset"], "data_checksum": summary.get("data_checksum"),
                 "test_sha256": summary.get("test", {}).get("sha256")},
        "git_commit": git_commit(ws.root),
        "world_size": world_size,
        "device": device,
        "nodes": nodes,
        "timings": {"wall_time_s": wall_s, "epoch_times_s": [e["epoch_time_s"] for e in epochs]},
        "best_epoch": best_epoch_number,
        "final": {k: best[k] for k in ("train_loss", "train_accuracy", "val_loss",
                                        "val_accuracy")},
    }
    write_model_pair(weights, card, ws.model_path, ws.model_card_path)
    write_json(ws.training_report_path, report)
    return report


def train(params: Params, ws: Workspace, *, resume: str = "auto") -> dict[str, Any]:
    """Train with Ray Train and write models/model.pt, models/model.json and
    reports/training.json; returns the training report."""
    started = time.perf_counter()
    t = params.train
    summary = check_processed(ws.processed_dir, params.data.dataset)
    address = t.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        gpus = _local_gpus() if t.use_gpu else 0
        cpus_per_worker = plan_resources(t.num_workers, t.use_gpu, local_cpus(), gpus,
                                         "this machine")
    storage = resolve_storage(t.storage_path, ws)
    check_storage(storage)
    name = f"dltrain-{run_key(params, str(summary.get('data_checksum')))}"
    resuming = prepare_run_dir(storage, name, resume)

    import ray

    # Ray Train (~0.7 s to import), imported while ray.init waits for the processes it starts,
    # costs the stage next to nothing. No torch in this process (dltrain.loopspec).
    train_import = _import_in_background("ray.train.v2.api.data_parallel_trainer",
                                         "dltrain.raybackend", "dltrain.raypolicy")
    started_local = start_ray(address, local_cpus())
    if started_local:
        _prestart_worker()
    train_import.join()

    try:
        if address is not None:
            # On a cluster each worker takes threads_per_worker CPUs (default 1) wherever
            # the placement strategy puts it; the check counts the whole cluster.
            cpus, gpus = _cluster_resources()
            cpus_per_worker = t.threads_per_worker or 1
            plan_resources(t.num_workers * cpus_per_worker, t.use_gpu, cpus, gpus,
                           f"the Ray cluster at {address}")
        threads = t.threads_per_worker or cpus_per_worker
        loop_cfg = LoopConfig(processed_dir=str(ws.processed_dir.resolve()),
                              hidden_sizes=tuple(params.model.hidden_sizes), epochs=t.epochs,
                              batch_size=t.batch_size, learning_rate=t.learning_rate,
                              optimizer=t.optimizer, seed=t.seed, threads=threads,
                              ema_decay=t.ema_decay)
        where = address or "a local Ray"
        print(f"training {params.data.dataset} on {where}: {t.num_workers} worker(s) x "
              f"{cpus_per_worker} CPU, {'GPU' if t.use_gpu else 'CPU'}, {t.epochs} epochs, "
              f"global batch {t.batch_size}"
              + (f"; resuming run {name} from its latest checkpoint" if resuming else ""),
              flush=True)
        result = _fit(params, loop_cfg, cpus_per_worker, storage, name, started_local)
        if result.checkpoint is None:
            raise TrainingError("training finished without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            epochs, weights = read_final_checkpoint(Path(directory), loop_cfg.hidden_sizes)
        metrics = result.metrics or {}
        report = write_outputs(epochs, weights, params, ws, summary, world_size=t.num_workers,
                               device="cuda" if t.use_gpu else "cpu",
                               nodes=list(metrics.get("nodes", [])),
                               wall_s=time.perf_counter() - started, name=name, storage=storage)
        mark_complete(storage, name, report)
    finally:
        if started_local:
            ray.shutdown()
    best = next(e for e in report["epochs"] if e["epoch"] == report["best_epoch"])
    print(f"trained {len(report['epochs'])} epochs in {report['wall_time_s']:.1f}s "
          f"({report['samples_per_s']:.0f} samples/s, Ray overhead "
          f"{report['ray_overhead_s']:.1f}s); best val_acc {best['val_accuracy']:.4f} at epoch "
          f"{best['epoch']}; wrote {ws.model_path.relative_to(ws.root)}", flush=True)
    return report


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


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
