"""Atomic writes: an output is written beside its final name and renamed into place, so a
crash or a full disk never leaves a truncated file that looks valid."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dltrain.errors import DiskFullError, NotWritableError


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (no space left) or EDQUOT (over quota): the same remedy for a user."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(path: Path, exc: OSError) -> DiskFullError:
    """The DltrainError for a write to `path` that failed for lack of space."""
    return DiskFullError(f"no space left on the device holding {path} ({exc.strerror}); "
                         "nothing was written there. Free some space (`df -h "
                         f"{Path(path).parent}`) and re-run the stage.")


# A directory that refuses writes: no permission, a read-only file system, or a path through
# a regular file (ENOTDIR; EEXIST from mkdir where a file holds the directory's name).
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)


def not_writable_error(path: Path, exc: OSError) -> NotWritableError:
    """The DltrainError for an output whose directory cannot be written, naming that
    directory (the nearest existing one above `path`)."""
    where = Path(path).parent
    while not where.exists() and where != where.parent:
        where = where.parent
    reason = ("is a file, not a directory" if where.exists() and not where.is_dir()
              else f"cannot be written ({(exc.strerror or str(exc)).lower()})")
    return NotWritableError(f"cannot write {path}: {where} {reason}; nothing was written. Make "
                            f"{where} a writable directory and re-run the stage.")


def _refuses_writes(exc: OSError, path: Path) -> bool:
    """`exc` is a write refused in `path`'s directory (not, say, a file the block reads)."""
    if exc.errno not in _NOT_WRITABLE:
        return False
    if exc.filename is None:
        return True
    failed, parent = Path(os.fsdecode(exc.filename)), Path(path).parent
    return failed == parent or parent in failed.parents or failed in parent.parents


@contextlib.contextmanager
def _disk_full_as_error(path: Path) -> Iterator[None]:
    # A full disk or a read-only directory is the user's to fix, not a bug: name the output
    # instead of a traceback.
    try:
        yield
    except (DiskFullError, NotWritableError) as exc:
        # From a nested writer (a file inside atomic_dir's staging): name the final output.
        cause = exc.__cause__
        if isinstance(cause, OSError):
            make = disk_full_error if isinstance(exc, DiskFullError) else not_writable_error
            raise make(path, cause) from cause
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, exc) from exc
        if _refuses_writes(exc, path):
            raise not_writable_error(path, exc) from exc
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; on success rename it onto `path`.

    A full disk, inside the block or while syncing, is a DiskFullError naming `path`, and the
    temporary file is removed: a truncated output never takes the final name."""
    path = Path(path)
    with _disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes it 0600; outputs get the usual mode
        try:
            yield tmp_path
            with open(tmp_path, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_path, path)
        finally:
            tmp_path.unlink(missing_ok=True)


def check_writable(path: Path) -> None:
    """Fail now, with the NotWritableError or DiskFullError the write would give, when `path`
    could not be written later (a stage checks its outputs before long work, not after):
    creates a temporary file in its directory, or in the nearest existing folder above it (the
    write would create the rest), then removes it. Leaves nothing behind: a stage that fails
    after the check (Ray refused, say) must not leave an empty output folder."""
    path = Path(path)
    with _disk_full_as_error(path):
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if not folder.is_dir():
                # A file where a folder must be: the error the write would give.
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
            fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe.tmp",
                                         dir=folder)
        except OSError as exc:
            if exc.errno in _NOT_WRITABLE:
                raise not_writable_error(path, exc) from exc
            raise
        os.close(fd)
        os.unlink(probe)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside `path`; if the block succeeds, it replaces
    `path` as a whole. On failure `path` is left exactly as it was and the staging is removed;
    a full disk while the block writes is a DiskFullError naming `path`.

    A directory cannot be renamed onto a non-empty one, so the old one is moved aside first
    (and moved back if the second rename fails): two renames on one file system, no copying.

    Both temporary names carry this process's id, so that the next writer of `path` can tell
    what a killed run (SIGKILL, power loss) left behind from what a running one is writing:
    it removes the dead owners' folders first (remove_stale_staging).
    """
    path = Path(path)
    with _disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.stage-",
                                        suffix=".tmp", dir=path.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; outputs get the usual mode
    try:
        with _disk_full_as_error(path):
            yield staging
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.{os.getpid()}.old-{uuid.uuid4().hex[:8]}.tmp")
            os.replace(path, old)
        try:
            os.replace(staging, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(path: Path) -> list[Path]:
    """Remove the staging folders that atomic_dir runs of `path` left when they were killed
    (their process is gone); keep those of live processes. A killed run's moved-aside previous
    `path` is put back when `path` is missing (the kill fell between the two renames), else
    removed. Returns what was removed or put back."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.(stage|old)-\w+\.tmp")
    cleaned = []
    try:
        entries = sorted(path.parent.iterdir())
    except OSError:
        return cleaned
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            if match.group(2) == "old" and not path.exists() and not path.is_symlink():
                os.replace(entry, path)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # not ours to fix here: the write that follows says why, if it fails
            continue
        cleaned.append(entry)
    if cleaned:
        print(f"note: cleaned up {len(cleaned)} staging folder(s) that killed runs left beside "
              f"{path}", file=sys.stderr)
    return cleaned


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine). A pid reused since only keeps a stale
    folder a while longer: the safe side."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; rename it onto `path` only if the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented, key-sorted JSON, atomically (stable bytes for DVC)."""
    with atomic_open(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)
