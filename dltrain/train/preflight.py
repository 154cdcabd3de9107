"""Checks made before any Ray process starts: the processed data is there and of the
configured data set, the workers fit the CPUs and GPUs, and which run this is (resume key)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dltrain.config import Params
from dltrain.errors import TrainingError
from dltrain.io import read_json
from dltrain.preprocess import split_paths


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
    """Identifies a training run: same params and data -> same key -> resumable. The
    checkpoint format is part of it, so a run of an older dltrain (state.pt checkpoints) is
    started afresh rather than resumed from files this one does not read."""
    from dltrain.loopspec import CHECKPOINT_STATE

    blob = json.dumps({"model": params.to_dict()["model"], "train": {
        k: v for k, v in params.to_dict()["train"].items()
        if k not in ("ray_address", "storage_path", "max_failures")}, "data": data_checksum,
        "checkpoint": CHECKPOINT_STATE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
