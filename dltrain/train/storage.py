"""Where Ray Train keeps a run's checkpoints (train.storage_path), checked before training,
the marker that tells a finished run from an interrupted one, and the two files of live
tracking (dltrain.train.live): the run's identity in MLflow and one file per finished epoch."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dltrain.atomic import atomic_dir
from dltrain.errors import TrainingError
from dltrain.paths import Workspace
from dltrain.train.loopconfig import CHECKPOINT_HISTORY

COMPLETE_MARKER = "dltrain-complete.json"
LAST_RUN = "dltrain-last-run.json"  # beside the run directories: the latest run's inputs
# Which MLflow run is this training run's: {"training_id": <uuid>}, the value of the run's
# dltrain.training_id tag. Kept with the checkpoints, so it goes when they go (a finished run,
# `--resume never`) and stays when the run is resumed.
IDENTITY_FILE = "dltrain-mlflow.json"
# One JSON file per epoch that Ray Train committed (dltrain.train.epochlog): what the driver
# sends to MLflow live, and what waits there while MLflow is unreachable.
EPOCHS_DIR = "dltrain-epochs"
# A failure that a retry would only repeat (dltrain.errors.CertainTrainingError), written by the
# worker that met it: a restarted worker group finds it and ends at once, and the driver reads it
# (and removes it) to fail with its message instead of Ray Train's retries.
FAILURE_FILE = "dltrain-certain-failure.json"
# A checkpoint's folder in the run directory: epoch_NNNN, the epoch it ends. The latest ones are
# kept: Ray Train's CheckpointConfig(num_to_keep) on a worker group, keep_checkpoint in local mode.
CHECKPOINT_DIR = "epoch_{epoch:04d}"
KEEP_CHECKPOINTS = 2


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

    Returns True when an interrupted run will be continued from its checkpoints (Ray Train
    restores a run of the same name and storage path)."""
    import pyarrow.fs

    fs, root = _filesystem(storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(run_dir).type == pyarrow.fs.FileType.NotFound:
        return False
    marker = fs.get_file_info(f"{run_dir}/{COMPLETE_MARKER}")
    if marker.type != pyarrow.fs.FileType.NotFound or resume == "never":
        fs.delete_dir(run_dir)
        return False
    return True


def swap_last_run(storage: str, name: str, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """Record run `name` (and what it is made of: preflight.run_inputs) as the latest of this
    storage; return the record of the one before when that run was interrupted (its directory
    is there, without the complete marker), so that a new run can say why it does not resume
    it. Best effort: a record that cannot be read or written only costs that sentence."""
    import pyarrow.fs

    fs, root = _filesystem(storage)
    path = f"{root.rstrip('/')}/{LAST_RUN}"
    previous = None
    try:
        with fs.open_input_stream(path) as fh:
            record = json.loads(fh.read())
        run_dir = f"{root.rstrip('/')}/{record['name']}"
        if fs.get_file_info(run_dir).type != pyarrow.fs.FileType.NotFound and fs.get_file_info(
                f"{run_dir}/{COMPLETE_MARKER}").type == pyarrow.fs.FileType.NotFound:
            previous = record
    except Exception:  # noqa: BLE001 - none yet, or unreadable: nothing to compare
        pass
    try:
        with fs.open_output_stream(path) as fh:
            fh.write(json.dumps({"name": name, "inputs": inputs}, sort_keys=True).encode())
    except Exception:  # noqa: BLE001 - the run itself does not need it
        pass
    return previous


def mark_complete(storage: str, name: str, report: dict[str, Any]) -> None:
    fs, root = _filesystem(storage)
    with fs.open_output_stream(f"{root.rstrip('/')}/{name}/{COMPLETE_MARKER}") as fh:
        fh.write(json.dumps({"finished_at": time.time(),
                             "epochs": len(report["epochs"])}).encode())


def training_id(storage: str, name: str) -> str:
    """The run's MLflow identity, read from its directory, or made and written there."""
    fs, root = _filesystem(storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    path = f"{run_dir}/{IDENTITY_FILE}"
    try:
        with fs.open_input_stream(path) as fh:
            return str(json.loads(fh.read())["training_id"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        pass
    made = uuid.uuid4().hex
    fs.create_dir(run_dir, recursive=True)
    _write(fs, path, {"training_id": made})
    return made


def write_epoch(storage: str, name: str, record: dict[str, Any]) -> None:
    """`record` (one epoch, as rank 0 reported it) as <run dir>/dltrain-epochs/epoch_NNNN.json."""
    fs, root = _filesystem(storage)
    folder = f"{root.rstrip('/')}/{name}/{EPOCHS_DIR}"
    fs.create_dir(folder, recursive=True)
    _write(fs, f"{folder}/epoch_{int(record['epoch']):04d}.json", record)


def read_epochs(storage: str, name: str, known: set[int] | frozenset[int] = frozenset()
                ) -> list[dict[str, Any]]:
    """The epochs written so far, in order, less those numbered in `known` (their files are not
    read again); a file still being written is left for later."""
    import pyarrow.fs

    fs, root = _filesystem(storage)
    selector = pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{name}/{EPOCHS_DIR}",
                                       allow_not_found=True)
    records = []
    for info in fs.get_file_info(selector):
        stem = info.base_name.removesuffix(".json")
        if not (stem.startswith("epoch_") and stem[6:].isdigit() and stem != info.base_name):
            continue
        if int(stem[6:]) in known:
            continue
        try:
            with fs.open_input_stream(info.path) as fh:
                records.append(json.loads(fh.read()))
        except (FileNotFoundError, ValueError):
            continue
    return sorted(records, key=lambda r: r["epoch"])


def last_epoch(storage: str, name: str) -> int:
    """The number of the latest committed epoch of run `name` (its checkpoint is the one a
    re-run resumes from), 0 when none is; only the names of the epoch files are read."""
    import pyarrow.fs

    fs, root = _filesystem(storage)
    selector = pyarrow.fs.FileSelector(f"{root.rstrip('/')}/{name}/{EPOCHS_DIR}",
                                       allow_not_found=True)
    numbers = [int(stem[6:]) for info in fs.get_file_info(selector)
               if (stem := info.base_name.removesuffix(".json")) != info.base_name
               and stem.startswith("epoch_") and stem[6:].isdigit()]
    return max(numbers, default=0)


def write_failure(storage: str, name: str, message: str) -> None:
    fs, root = _filesystem(storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    fs.create_dir(run_dir, recursive=True)
    _write(fs, f"{run_dir}/{FAILURE_FILE}", {"message": message})


def read_failure(storage: str, name: str, *, remove: bool = False) -> str | None:
    """The certain failure recorded in run `name`'s directory, if any (removed with `remove`,
    so that a re-run after a fix starts without it)."""
    fs, root = _filesystem(storage)
    path = f"{root.rstrip('/')}/{name}/{FAILURE_FILE}"
    try:
        with fs.open_input_stream(path) as fh:
            message = str(json.loads(fh.read())["message"])
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None
    if remove:
        fs.delete_file(path)
    return message


def local_run_dir(storage: str, name: str) -> Path:
    """Run `name`'s directory on this machine, for local mode (train.num_workers 0), which
    keeps its own checkpoints there: Ray Train's local mode stores nothing in storage_path."""
    if "://" in storage:
        raise TrainingError(f"train.storage_path {storage!r} is not a path on this machine: "
                            "local mode (train.num_workers 0) keeps its checkpoints on this "
                            "machine; give a local path (or null), or train.num_workers >= 1")
    return Path(storage) / name


def keep_checkpoint(run_dir: Path, epoch: int, write: Callable[[Path], None]) -> Path:
    """Local mode's checkpoint of `epoch`: `write(folder)` fills a staging folder, which then
    becomes <run dir>/epoch_NNNN whole (a run killed while writing leaves the previous
    checkpoint the latest); all but the latest KEEP_CHECKPOINTS are removed."""
    final = run_dir / CHECKPOINT_DIR.format(epoch=epoch)
    with atomic_dir(final) as staging:
        write(staging)
    for old in _checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The latest complete checkpoint folder of a local-mode run, or None."""
    found = _checkpoints(run_dir)
    return found[-1] if found else None


def _checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders, oldest first (a staging folder's name starts with a dot)."""
    found = [p for p in run_dir.glob("epoch_*") if p.name[6:].isdigit()
             and (p / CHECKPOINT_HISTORY).is_file()]
    return sorted(found, key=lambda p: int(p.name[6:]))


def _write(fs: Any, path: str, data: dict[str, Any]) -> None:
    """Whole or not at all: a temporary name, then a rename (an object store's put is atomic
    by itself, and its move a copy)."""
    temp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(temp) as fh:
        fh.write(json.dumps(data).encode())
    fs.move(temp, path)
