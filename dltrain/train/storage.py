"""Where Ray Train keeps a run's checkpoints (train.storage_path), checked before training,
and the marker that tells a finished run from an interrupted one."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dltrain.errors import TrainingError
from dltrain.paths import Workspace

COMPLETE_MARKER = "dltrain-complete.json"


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


def mark_complete(storage: str, name: str, report: dict[str, Any]) -> None:
    fs, root = _filesystem(storage)
    with fs.open_output_stream(f"{root.rstrip('/')}/{name}/{COMPLETE_MARKER}") as fh:
        fh.write(json.dumps({"finished_at": time.time(),
                             "epochs": len(report["epochs"])}).encode())
