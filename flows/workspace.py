"""The flow's hold on a workspace: an exclusive lock, and the run's params in params.yaml.

`dvc repro` reads no other params file, and `dvc exp run --set-param` makes an experiment, not
a production run: a run writes its overrides into params.yaml while it holds the lock (DVC sees
and records them as an edit), then puts the file back, or the next run does (a journal)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from dltrain.atomic import atomic_path
from dltrain.errors import DltrainError

_LOG = logging.getLogger("dltrain.flows")
# Inside .dvc/tmp: git-ignored by DVC's own .gitignore, and never a DVC dependency.
LOCK_RELPATH = Path(".dvc") / "tmp" / "dltrain-flow.lock"


class WorkspaceBusyError(DltrainError):
    """Another flow run holds the workspace."""


@contextlib.contextmanager
def workspace_lock(root: Path, holder: str) -> Iterator[None]:
    """Hold the workspace exclusively, or fail at once naming who holds it. The kernel
    releases an flock when its process dies, so a crashed run never leaves it stale."""
    path = root / LOCK_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise WorkspaceBusyError(
                f"the workspace {root} is in use by another pipeline run ({fh.read().strip()});"
                " wait for it to finish, or cancel it (prefect flow-run cancel <id>), then run "
                "again") from None
        fh.truncate(0)
        fh.write(f"{holder}, pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


def render_overrides(text: str, overrides: dict[str, Any]) -> str:
    """`text` (a params.yaml) with `overrides` set, comments and layout kept."""
    yaml = YAML()  # round-trip
    yaml.preserve_quotes, yaml.width = True, 100
    doc = yaml.load(text) or CommentedMap()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        doc[section] = doc.get(section) or CommentedMap()  # also for an empty section
        doc[section][key] = value
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def params_journal_path(params_path: Path) -> Path:
    return params_path.parent / LOCK_RELPATH.parent / f"dltrain-{params_path.name}.orig.json"


def _write(path: Path, text: str) -> None:
    """Replace `path` atomically, keeping its permission bits (mkstemp's are 0600)."""
    mode = path.stat().st_mode & 0o777
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        os.chmod(tmp, mode)


def _put_back(params_path: Path, original: str, written: str, logger: Any) -> None:
    """params.yaml back to `original`, unless it was edited since `written` (the edit wins)."""
    current = params_path.read_text()
    if current == written:
        _write(params_path, original)
    elif current != original:
        logger.warning("%s was edited since; leaving it as it is now", params_path)
    params_journal_path(params_path).unlink(missing_ok=True)


@contextlib.contextmanager
def params_overridden(params_path: Path, overrides: dict[str, Any],
                      logger: Any = _LOG) -> Iterator[None]:
    """Write `overrides` into params.yaml for the block, then put the file back. First, put
    back what a killed run left overridden. Call it holding the workspace lock."""
    journal = params_journal_path(params_path)
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        left = json.loads(journal.read_text())
        logger.warning("a previous run was killed with its overrides in %s", params_path)
        _put_back(params_path, left["original"], left["written"], logger)
    journal.unlink(missing_ok=True)  # also an unreadable one: nothing it says can be trusted
    if not overrides:
        yield
        return
    original = params_path.read_text()
    written = render_overrides(original, overrides)
    journal.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(journal) as tmp:  # first: the file is never overridden unrecorded
        tmp.write_text(json.dumps({"original": original, "written": written}))
    _write(params_path, written)
    try:
        yield
    finally:
        _put_back(params_path, original, written, logger)
