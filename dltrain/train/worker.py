"""The training function each Ray Train worker runs: dltrain.train.loop's plain PyTorch loop, with
Ray Train's public API for the rest (rank and world size, DDP, checkpoints, reports).

Only the workers import torch (this module imports it inside the function): the driver hands
the loop its config and installs the model bytes rank 0 puts in the last checkpoint.

In Ray Train's local mode (train.num_workers 0, config["local"]) the same function runs in the
stage's own process, as rank 0 of 1, with no Ray started. Ray Train then keeps nothing: the
function keeps each epoch's checkpoint in the run directory itself, resumes from the one the
driver passes (config["resume_from"]), and writes the epoch log that a worker group's callback
writes (dltrain.train.epochlog).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

# The node a local-mode run names in its reports: no Ray node exists.
LOCAL_NODE = "local"


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Runs in each worker: the loop, with Ray's DDP, all-reduce and report."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from dltrain.errors import CertainTrainingError
    from dltrain.train.epochlog import record_epoch
    from dltrain.train.loop import EpochRecord, LoopConfig, format_epoch, save_state, train_loop
    from dltrain.train.storage import keep_checkpoint, read_failure, write_failure

    local = bool(config.get("local"))
    if not local:
        # Ray Train points the worker's root logger at the console at INFO, and logs every
        # report() there (a long line per epoch); the epoch's own line says what matters.
        # In local mode this is the user's process: its logging is left alone.
        logging.getLogger().setLevel(logging.WARNING)
    if config.get("storage") and read_failure(config["storage"], config["name"]):
        return  # restarted after a certain failure: the driver reports it, nothing to retry
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = LoopConfig(**config["loop"])
    # Local mode's get_device() is this process' current CUDA device whenever one exists.
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    node_id = LOCAL_NODE if local else ray.get_runtime_context().get_node_id()
    # Rank 0's lines: on the driver's terminal with a progress bar, else to stdout (Ray
    # forwards them to the driver's output: a log, DVC's or Prefect's capture).
    out = Output.for_rank(rank, config.get("progress"), node_id)
    nodes = [node_id]
    if world > 1:
        nodes = [None] * world
        dist.all_gather_object(nodes, node_id)  # a barrier: every worker is up past here
    if rank == 0 and not local:
        _announce_ready(out, nodes, device.type)

    def allreduce(t: torch.Tensor) -> torch.Tensor:
        if world == 1:
            return t
        moved = t.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(moved)
        return moved.cpu()

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        # One gradient bucket: the whole MLP is 1.6 MB, so a single all-reduce per step beats
        # several small ones on a CPU with no core spare to overlap them.
        # move_to_device: the device chosen above (local mode would pick a GPU whenever
        # there is one, train.use_gpu false or not).
        return ray.train.torch.prepare_model(
            model, move_to_device=device, parallel_strategy_kwargs={"bucket_cap_mb": 64,
                                             "gradient_as_bucket_view": True})

    restored = _restored_state(config.get("resume_from"))
    if restored is not None and rank == 0:
        last = restored.history[-1]["epoch"]
        out.line(f"resuming from the checkpoint of epoch {last}: epoch {last + 1} of "
                 f"{cfg.epochs} is next")

    def on_epoch_end(record: EpochRecord, snapshot) -> None:
        # report() is a barrier: every rank reports once per epoch; rank 0 alone attaches the
        # checkpoint (Ray Train keeps rank 0's).
        metrics = {**asdict(record), "nodes": nodes}
        if rank != 0:
            ray.train.report(metrics)
            return
        out.line(format_epoch(record, cfg.epochs))
        if local:
            # Kept in the run directory, then reported (the run's result), then logged for
            # live tracking: the order in which a worker group's epoch is committed.
            kept = keep_checkpoint(Path(config["run_dir"]), record.epoch,
                                   lambda folder: save_state(snapshot(), folder))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(kept)))
            record_epoch(config["storage"], config["name"], metrics)
            return
        with tempfile.TemporaryDirectory() as directory:
            save_state(snapshot(), Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch_{record.epoch:04d}")

    try:
        train_loop(cfg, rank=rank, world_size=world, device=device, wrap_model=wrap,
                   allreduce=allreduce, restored=restored, on_epoch_end=on_epoch_end,
                   on_epoch_start=out.epoch_bar(cfg.epochs))
    except (CertainTrainingError, MemoryError, torch.OutOfMemoryError) as exc:
        # Certain: a non-finite loss (every rank sees the same all-reduced figures, so all stop
        # together), or memory that the first attempt already lacked. Ray Train retries any
        # worker error (FailureConfig has no per-error policy), so the failure is recorded for
        # the driver, and a worker group started again for it ends at once (above).
        certain = _as_certain(exc, first_attempt=restored is None, rank=rank, cfg=cfg)
        if certain is None:
            raise  # a later attempt: the memory may have been taken by something else
        write_failure(config["storage"], config["name"], str(certain))
        if certain is not exc and world > 1:
            raise  # the other ranks wait in a collective: end the group; its restart stops
    finally:
        out.close()


def _announce_ready(out: Output, nodes: list[str], device_type: str) -> None:
    """The end of the wait the driver announced ("starting N Ray Train workers"): the
    processes started, imported PyTorch and joined the process group."""
    import torch

    world, hosts = len(nodes), len(set(nodes))
    out.line(f"{world} worker{'s' if world > 1 else ''} ready on {hosts} node"
             f"{'s' if hosts > 1 else ''} (PyTorch {torch.__version__.split('+')[0]}, "
             f"{device_type})")


def _restored_state(resume_from: str | None) -> Any:
    """The loop state to continue from: the checkpoint Ray Train hands a restarted or restored
    worker group; in local mode, the interrupted run's latest checkpoint that the driver found
    (`resume_from`); else None."""
    import ray.train

    from dltrain.train.loop import load_state

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(resume_from)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_state(Path(directory))


def _as_certain(exc: BaseException, *, first_attempt: bool, rank: int,
                cfg: Any) -> BaseException | None:
    """The certain failure `exc` stands for, or None when another attempt may succeed: a
    non-finite loss always is one; running out of memory is one in the first attempt only."""
    from dltrain.errors import CertainTrainingError

    if isinstance(exc, CertainTrainingError):
        return exc
    if not first_attempt:
        return None
    return CertainTrainingError(
        f"out of memory on worker {rank} in the first attempt: model.hidden_sizes "
        f"{list(cfg.hidden_sizes)} with global batch {cfg.batch_size} does not fit "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


class Output:
    """Where a worker's lines go. Off a terminal (or on any rank but 0): stdout, lines only.
    With the driver's stdout a terminal and rank 0 on the driver's Ray node, rank 0 writes to
    that terminal itself, with a tqdm bar of the epoch's batches: Ray forwards a worker's
    output line by line, so a bar sent that way would never move, and a line forwarded late
    would land in the middle of the next epoch's bar."""

    def __init__(self, terminal: Any = None) -> None:
        self.terminal, self.bar = terminal, None

    @classmethod
    def for_rank(cls, rank: int, progress: dict[str, str] | None, node_id: str) -> Output:
        # The terminal's path names a device of the driver's machine: the node check keeps a
        # worker elsewhere from writing to a terminal of its own machine.
        if rank != 0 or not progress or progress.get("node_id") != node_id:
            return cls()
        try:
            return cls(open(progress["tty"], "w", buffering=1))  # noqa: SIM115 (closed by close)
        except OSError:
            return cls()

    def line(self, text: str) -> None:
        if self.terminal is None:
            say(text)
            return
        self._close_bar()
        self.terminal.write(text + "\n")

    def epoch_bar(self, epochs: int) -> Any:
        """For train_loop's on_epoch_start: a bar per epoch on the terminal, else nothing."""
        if self.terminal is None:
            return None
        from tqdm import tqdm

        def start(epoch: int, batches: int) -> Any:
            self._close_bar()
            self.bar = tqdm(total=batches, desc=f"epoch {epoch}/{epochs}", unit="batch",
                            file=self.terminal, leave=False, dynamic_ncols=True,
                            mininterval=0.2)
            return self.bar.update
        return start

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=False: the bar's line is cleared for the epoch's line
            self.bar = None

    def close(self) -> None:
        self._close_bar()
        if self.terminal is not None:
            self.terminal.close()


def say(line: str) -> None:
    """One line to the worker's stdout, which Ray forwards to the driver's console. Not
    print(): Ray Train replaces print in its workers with a logger call that, with stdout
    redirected (DVC, Prefect), also prints, so every line would show twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
