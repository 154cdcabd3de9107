"""The per-worker training loop, in plain PyTorch.

No Ray here: the loop takes its rank, world size and three small hooks (wrap the model for
data parallelism, sum tensors across workers, report an epoch), so a unit test runs it
in-process and dltrain/train/worker.py plugs in Ray Train's versions.

Data path: the processed arrays are memory-mapped uint8; each worker reads only its shard of
each epoch's global permutation, cuts batches by fancy-indexing the map (no per-sample Python
Dataset in the hot loop), and normalises on the fly. On a GPU the shard is copied to the device
once, as uint8, and batches are cut there.
"""

from __future__ import annotations

import json
import math
import pickle
import resource
import struct
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dltrain.errors import CertainTrainingError, ModelError
from dltrain.model.mlp import MLP, normalize
from dltrain.model.torchio import weights_bytes
from dltrain.paths import split_paths
from dltrain.train.loopconfig import (
    CHECKPOINT_HISTORY,
    CHECKPOINT_MODEL,
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_STATE,
    LoopConfig,
    best_epoch,
)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    epoch_time_s: float
    samples: int  # training samples seen by all workers this epoch
    attempt: int = 0  # how many times training was restored from a checkpoint before this epoch
    peak_rss_mb: list[float] = field(default_factory=list)  # per worker, by rank


@dataclass
class LoopState:
    """What a checkpoint holds: enough to continue exactly where training stopped (the raw
    weights, the optimizer and the averaged weights), and the weights of the epoch with the
    best validation accuracy so far: the model the stage ships, as Keras'
    ModelCheckpoint(save_best_only=True) would."""
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = None
    ema: dict[str, torch.Tensor] | None = None
    ema_steps: int = 0

    @property
    def next_epoch(self) -> int:
        return self.history[-1]["epoch"] + 1 if self.history else 1

    @property
    def best_epoch(self) -> int | None:
        return best_epoch(self.history)


def save_state(state: LoopState, directory: Path) -> None:
    """A checkpoint (see dltrain.train.loopconfig): the tensors in safetensors, the optimizer's
    state as torch saves it (its nested dict of tensors and numbers has no safetensors form), the
    epochs in JSON, and the weights the stage ships in the models/model.safetensors format."""
    from safetensors.torch import save

    tensors = {f"{part}/{name}": tensor for part, weights in
               (("model", state.model), ("best_model", state.best_model), ("ema", state.ema))
               for name, tensor in (weights or {}).items()}
    (directory / CHECKPOINT_STATE).write_bytes(
        save({k: v.contiguous() for k, v in tensors.items()},
             metadata={"ema_steps": str(state.ema_steps)}))
    torch.save(state.optimizer, directory / CHECKPOINT_OPTIMIZER)
    (directory / CHECKPOINT_HISTORY).write_text(json.dumps(state.history))
    # The model the stage ships, serialised here: the driver installs the bytes without torch.
    (directory / CHECKPOINT_MODEL).write_bytes(weights_bytes(state.best_model or state.model))


def load_state(directory: Path) -> LoopState:
    """A checkpoint written by save_state; ModelError if it is not tensors, the optimizer's
    plain state (torch.load(weights_only=True): never code) and JSON."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = directory / CHECKPOINT_STATE
    optimizer_path = directory / CHECKPOINT_OPTIMIZER
    try:
        # Read into memory, not memory-mapped: a file cut short under a map is a SIGBUS.
        data = path.read_bytes()
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load(data).items():
            part, _, name = key.partition("/")
            parts.setdefault(part, {})[name] = tensor
        (length,) = struct.unpack("<Q", data[:8])  # load() checked the header already
        metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
        ema_steps = int(metadata.get("ema_steps", "0"))
        # weights_only: a checkpoint is data, never code.
        optimizer = torch.load(optimizer_path, map_location="cpu", weights_only=True)
        history = json.loads((directory / CHECKPOINT_HISTORY).read_text())
    except pickle.UnpicklingError as exc:
        raise ModelError(f"checkpoint {optimizer_path} is not plain data: it holds objects "
                         "that would run code when loaded, so it was refused") from exc
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError,
            zipfile.BadZipFile) as exc:
        raise ModelError(f"checkpoint {directory} is corrupt or incomplete: {exc}") from exc
    if "model" not in parts or not isinstance(optimizer, dict):
        raise ModelError(f"checkpoint {directory} lacks the model or optimizer state")
    return LoopState(parts["model"], optimizer, history, parts.get("best_model"),
                     parts.get("ema"), ema_steps)


def load_split(processed_dir: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one split's images (N, 28, 28) and labels (N,), both uint8."""
    images_path, labels_path = split_paths(processed_dir, split)
    return np.load(images_path, mmap_mode="r"), np.load(labels_path, mmap_mode="r")


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "rmsprop":
        # Keras' RMSprop defaults (rho 0.9, epsilon 1e-7), so results compare with the seed
        # program; PyTorch's own defaults differ (alpha 0.99, eps 1e-8).
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int) -> np.ndarray:
    """This worker's sample indices for one epoch: a seeded global permutation, cut so that
    every worker gets the same count (DDP needs equal step counts; at most world_size - 1
    samples are left out of an epoch, a different few each time)."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_worker = n // world_size
    return perm[rank * per_worker:(rank + 1) * per_worker]


class Split:
    """A split's arrays, on the CPU as memory maps or on the GPU as one uint8 tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, device: torch.device) -> None:
        self.device = device
        self.n = len(labels)
        if device.type == "cuda":
            self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
            self.labels = torch.from_numpy(np.ascontiguousarray(labels)).to(device).long()
        else:
            self.images, self.labels = images, labels

    def batches(self, indices: np.ndarray, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type == "cuda":
            idx_all = torch.from_numpy(indices).to(self.device)
            for start in range(0, len(indices), batch_size):
                idx = idx_all[start:start + batch_size]
                yield normalize(self.images[idx]), self.labels[idx]
            return
        for start in range(0, len(indices), batch_size):
            # Sorted reads touch the memory map in order; the order inside a batch does not
            # matter to the gradient.
            idx = np.sort(indices[start:start + batch_size])
            yield (normalize(torch.from_numpy(self.images[idx])),
                   torch.from_numpy(self.labels[idx].astype(np.int64)))


Allreduce = Callable[[torch.Tensor], torch.Tensor]


def _identity_sum(t: torch.Tensor) -> torch.Tensor:
    return t


def evaluate_shard(model: nn.Module, split: Split, indices: np.ndarray, batch_size: int,
                   allreduce: Allreduce = _identity_sum) -> tuple[float, float]:
    """Mean loss and accuracy over `indices` of every worker (sums are reduced across workers)."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(3, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for x, y in split.batches(indices, batch_size):
            logits = model(x)
            totals += torch.tensor([loss_fn(logits, y).item(),
                                    (logits.argmax(1) == y).sum().item(), len(y)],
                                   dtype=torch.float64)
    totals = allreduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


class WeightAverage:
    """An exponential moving average of the weights, updated after every optimizer step
    (Polyak averaging). RMSprop at Keras' constant learning rate keeps jumping around a
    minimum: on Fashion-MNIST its last-epoch test accuracy swings between 0.86 and 0.87 with
    the seed, while the average of the recent steps sits near the middle of that basin
    (0.88-0.89 here). Every worker holds identical weights after a DDP step, so each keeps
    the same average without communication.

    The decay warms up as in TensorFlow's ExponentialMovingAverage(num_updates): step t uses
    min(decay, (1 + t) / (10 + t)), so a short run is not stuck near its initial weights."""

    def __init__(self, model: nn.Module, decay: float, steps: int = 0) -> None:
        self.decay = decay
        self.steps = steps
        self.model = MLP(model.hidden_sizes).to(next(model.parameters()).device)
        self.model.load_state_dict(model.state_dict())
        self.model.requires_grad_(False)
        self._source = list(model.parameters())
        self._target = list(self.model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        # Not torch.optim.swa_utils.AveragedModel: its EMA has no warm-up, and it wraps the
        # model, which would rename the averaged weights' keys in every checkpoint.
        for target, source in zip(self._target, self._source, strict=True):
            target.lerp_(source, 1.0 - decay)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, split: Split,
                indices: np.ndarray, batch_size: int,
                average: WeightAverage | None = None,
                on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """One pass over this worker's shard; returns (loss sum, correct, count) as a tensor.
    `on_batch()` is called after each step (a progress bar)."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss_sum = torch.zeros((), device=split.device)
    correct = torch.zeros((), device=split.device, dtype=torch.long)
    count = 0
    for x, y in split.batches(indices, batch_size):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits, y)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update()
        # Accumulate on the device: no host sync per step.
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        count += len(y)
        if on_batch is not None:
            on_batch()
    return torch.tensor([loss_sum.item(), correct.item(), count], dtype=torch.float64)


def train_loop(cfg: LoopConfig, *, rank: int = 0, world_size: int = 1,
               device: torch.device | None = None,
               wrap_model: Callable[[nn.Module], nn.Module] = lambda m: m,
               allreduce: Allreduce = _identity_sum,
               restored: LoopState | None = None,
               on_epoch_end: Callable[[EpochRecord, Callable[[], LoopState]], None] | None = None,
               on_epoch_start: Callable[[int, int], Callable[[], None] | None] | None = None,
               ) -> LoopState:
    """Train for cfg.epochs epochs (continuing after `restored`, if given) and return the state.

    `on_epoch_end(record, snapshot)` is called on every worker after each epoch; `snapshot()`
    builds the checkpoint state (call it on rank 0 only). `on_epoch_start(epoch, batches)`, if
    given, is called before each epoch with this worker's number of batches, and may return a
    function to call after each batch (a progress bar).
    """
    if cfg.batch_size % world_size:
        raise ValueError(f"global batch {cfg.batch_size} does not split across "
                         f"{world_size} workers")
    device = device or torch.device("cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # same initial weights on every worker
    model = MLP(cfg.hidden_sizes).to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.learning_rate)
    history: list[dict[str, Any]] = []
    attempt = 0
    best_model: dict[str, torch.Tensor] | None = None
    if restored is not None:
        model.load_state_dict(restored.model)
        optimizer.load_state_dict(restored.optimizer)
        history = list(restored.history)
        best_model = restored.best_model
        attempt = (history[-1].get("attempt", 0) + 1) if history else 0
    start_epoch = restored.next_epoch if restored else 1
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
    if average is not None and restored is not None and restored.ema is not None:
        average.model.load_state_dict(restored.ema)
        average.steps = restored.ema_steps
    model = wrap_model(model)
    plain = model.module if hasattr(model, "module") else model
    # The model that is validated and shipped: the averaged weights when averaging is on.
    shipped = average.model if average is not None else plain

    train = Split(*load_split(cfg.processed_dir, "train"), device)
    val = Split(*load_split(cfg.processed_dir, "val"), device)
    per_worker_batch = cfg.batch_size // world_size
    val_idx = np.arange(rank, val.n, world_size)

    def weights(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def snapshot() -> LoopState:
        return LoopState(weights(plain), optimizer.state_dict(), list(history), best_model,
                         weights(average.model) if average is not None else None,
                         average.steps if average is not None else 0)

    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        idx = shard_indices(train.n, rank, world_size, cfg.seed, epoch)
        on_batch = (on_epoch_start(epoch, -(-len(idx) // per_worker_batch))
                    if on_epoch_start is not None else None)
        sums = allreduce(train_epoch(model, optimizer, train, idx, per_worker_batch, average,
                                     on_batch))
        val_loss, val_acc = evaluate_shard(shipped, val, val_idx, 1024, allreduce)
        record = EpochRecord(epoch=epoch, train_loss=float(sums[0] / sums[2]),
                             train_accuracy=float(sums[1] / sums[2]), val_loss=val_loss,
                             val_accuracy=val_acc, epoch_time_s=time.perf_counter() - started,
                             samples=int(sums[2]), attempt=attempt)
        # The figures are all-reduced, so every worker stops here together. The epoch is not
        # reported: the checkpoint before it stays the run's latest.
        if not (math.isfinite(record.train_loss) and math.isfinite(record.val_loss)):
            raise CertainTrainingError(
                f"the loss is not finite at epoch {epoch} (train loss {record.train_loss}, "
                f"val loss {record.val_loss}): training diverged; lower train.learning_rate "
                f"(now {cfg.learning_rate:g}). The checkpoint of epoch {epoch - 1} is kept"
                if epoch > 1 else
                f"the loss is not finite at epoch 1 (train loss {record.train_loss}, val loss "
                f"{record.val_loss}): training diverged; lower train.learning_rate (now "
                f"{cfg.learning_rate:g})")
        best_so_far = max((e["val_accuracy"] for e in history), default=-1.0)
        record.peak_rss_mb = _peak_rss_mb(rank, world_size, allreduce)
        history.append(asdict(record))
        if best_model is None or record.val_accuracy > best_so_far:
            best_model = weights(shipped)
        if on_epoch_end is not None:
            on_epoch_end(record, snapshot)
    return snapshot()


def _peak_rss_mb(rank: int, world_size: int, allreduce: Allreduce) -> list[float]:
    """Every worker's peak resident memory so far, gathered with one all-reduce."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mine = rss / (1 << 20) if sys.platform == "darwin" else rss / 1024  # bytes vs KiB
    gathered = torch.zeros(world_size, dtype=torch.float64)
    gathered[rank] = mine
    return [round(float(v), 1) for v in allreduce(gathered)]


def format_epoch(record: EpochRecord | dict[str, Any], epochs: int) -> str:
    """One readable progress line per epoch."""
    r = asdict(record) if isinstance(record, EpochRecord) else record
    return (f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  "
            f"acc {r['train_accuracy']:.4f}  val_loss {r['val_loss']:.4f}  "
            f"val_acc {r['val_accuracy']:.4f}  {r['epoch_time_s']:.1f}s")
