"""Checks made before any Ray process starts: the processed data is there and of the
configured data set, the workers fit the CPUs and GPUs, and which run this is (resume key)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dltrain.atomic import read_json
from dltrain.config import Params
from dltrain.errors import ConfigError, TrainingError
from dltrain.paths import ProcessedFiles


def check_processed(processed_dir: Path, dataset: str) -> dict[str, Any]:
    """The processed data exists and is of the configured data set; returns its summary."""
    processed = ProcessedFiles(Path(processed_dir))
    summary_path = processed.summary
    if not summary_path.is_file():
        raise TrainingError(f"processed data not found: {summary_path} is missing "
                            "(run `dltrain preprocess` or `dvc repro preprocess` first)")
    summary = read_json(summary_path)
    if summary.get("dataset") != dataset:
        raise TrainingError(f"processed data in {processed_dir} is {summary.get('dataset')!r}, "
                            f"but data.dataset is {dataset!r}; re-run download and preprocess "
                            "(`dvc repro preprocess`)")
    for split in ("train", "val"):
        for path in processed.split(split):
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


# Float32 copies of the weights a worker holds at once, besides the optimizer's: the model, its
# gradients, the best epoch's copy and the checkpoint snapshot. A floor, not an estimate of
# the peak: a model refused by it cannot train here.
_WEIGHT_COPIES = 4
_OPTIMIZER_COPIES = {"sgd": 0, "rmsprop": 1, "adam": 2}


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(params: Params, available_bytes: int, where: str) -> None:
    """A model whose weights alone (with their gradients, copies and optimizer state) cannot
    fit in `where`'s available memory is a ConfigError naming model.hidden_sizes now, not an
    out-of-memory error in every worker after Ray has started."""
    sizes = [784, *params.model.hidden_sizes, 10]
    count = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
    copies = (_WEIGHT_COPIES + _OPTIMIZER_COPIES.get(params.train.optimizer, 2)
              + (1 if params.train.ema_decay else 0))
    workers = max(1, params.train.num_workers)  # local mode (0) is one process
    need = count * 4 * copies * workers
    if need > available_bytes:
        raise ConfigError(
            f"model.hidden_sizes {list(params.model.hidden_sizes)} is {count:,} weights: "
            f"at least {need / 2**30:.1f} GiB for {workers} worker(s) (weights, gradients, "
            f"copies and {params.train.optimizer} state), but {where} has "
            f"{available_bytes / 2**30:.1f} GiB available; use smaller model.hidden_sizes")


def changed_params(started: Params, now: Params) -> list[str]:
    """The model and train params that differ between the two, as `train.epochs 5 -> 2`
    (train.ray_address aside: where the run trains does not change the model)."""
    before, after = started.to_dict(), now.to_dict()
    changes = []
    for section in ("model", "train"):
        old, new = before.get(section) or {}, after.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if key != "ray_address" and old.get(key) != new.get(key):
                changes.append(f"{section}.{key} {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def run_inputs(params: Params, summary: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides what a run trains on and how: the model and train params (less
    where and how robustly it runs), the processed splits' checksums (a re-split of the same
    raw data, e.g. another data.val_fraction, is other training data), the raw data's, and the
    checkpoint format (a run of an older dltrain, state.pt checkpoints, is not resumed from
    files this one does not read)."""
    from dltrain.train.loopconfig import CHECKPOINT_STATE

    config = params.to_dict()
    return {"model": config["model"],
            "train": {k: v for k, v in config["train"].items()
                      if k not in ("ray_address", "storage_path", "max_failures")},
            "data": {"raw": summary.get("data_checksum"),
                     **{split: (summary.get(split) or {}).get("sha256")
                        for split in ("train", "val", "test")}},
            "checkpoint": CHECKPOINT_STATE}


def run_key(params: Params, summary: dict[str, Any]) -> str:
    """Identifies a training run: the same run_inputs -> the same key -> resumable; anything
    else is another run, which starts clean."""
    blob = json.dumps(run_inputs(params, summary), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def what_changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The keys of run_inputs that differ, as `train.epochs 5 -> 3` or `data.val` (a
    checksum), in sorted order."""
    changes = []
    for section in sorted(set(before) | set(after)):
        old, new = before.get(section), after.get(section)
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                changes.append(section)
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                shown = "" if section == "data" else f" {old.get(key)!r} -> {new.get(key)!r}"
                changes.append(f"{section}.{key}{shown}")
    return changes


def fresh_reason(previous: dict[str, Any] | None, name: str,
                 inputs: dict[str, Any]) -> str | None:
    """Why run `name` starts clean although an interrupted run (`previous`, from
    storage.swap_last_run) is there: what differs between the two; None when nothing to say."""
    if not previous or previous.get("name") == name:
        return None
    changed = what_changed(previous.get("inputs") or {}, inputs)
    return (f"starting fresh: the interrupted run {previous.get('name')} is not resumed, it "
            f"was made of other inputs ({', '.join(changed) or 'unknown'})")
