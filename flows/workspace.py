"""The flow's hold on a workspace: an exclusive lock, and the run's params written into
params.yaml for the duration of the run.

Why params.yaml: DVC records in dvc.lock the params a stage read from params.yaml, and decides
from them whether a stage changed. Writing the run's validated overrides there (what
`dvc exp run --set-param` does) makes a flow run's parameters visible to DVC exactly like an
edit by hand; the file is put back as it was when the run ends, so an override lasts one run
(also when the run was killed: the next run puts it back, from the journal kept in .dvc/tmp).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from dltrain.atomic import atomic_path
from dltrain.config import Params, apply_overrides, params_from_dict, read_params_file
from dltrain.errors import ConfigError, DltrainError

# Inside .dvc/tmp: git-ignored by DVC's own .gitignore, and never a DVC dependency.
LOCK_RELPATH = Path(".dvc") / "tmp" / "dltrain-flow.lock"


class WorkspaceBusyError(DltrainError):
    """Another flow run holds the workspace."""


def validate_overrides(params_path: Path, overrides: dict[str, Any]) -> Params:
    """params.yaml with `overrides` (section.key -> value) applied, through the typed config:
    a ConfigError names the key before any stage runs."""
    for key in overrides:
        section, _, name = key.partition(".")
        if not section or not name:
            raise ConfigError(f"invalid override key {key!r}; expected section.key, "
                              "e.g. train.epochs")
    return params_from_dict(apply_overrides(read_params_file(params_path), overrides))


@contextlib.contextmanager
def workspace_lock(root: Path, holder: str) -> Iterator[None]:
    """Hold the workspace exclusively, or fail at once naming who holds it. An flock is
    released by the kernel when its process dies, so a crashed run never leaves it stale."""
    path = root / LOCK_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise WorkspaceBusyError(
                f"the workspace {root} is in use by another pipeline run "
                f"({_describe_holder(fh.read())}); wait for it to finish, or cancel it "
                "(prefect flow-run cancel <id>), then run again") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"holder": holder, "pid": os.getpid(),
                             "host": socket.gethostname(), "since": time.time()}))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"{info['holder']}, pid {info['pid']} on {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps comments, key order and layout
    yaml.preserve_quotes = True
    yaml.width = 100
    return yaml


def render_overrides(text: str, overrides: dict[str, Any]) -> str:
    """`text` (a params.yaml) with `overrides` set, comments and layout kept."""
    yaml = _yaml()
    doc = yaml.load(text) or CommentedMap()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if doc.get(section) is None:
            doc[section] = CommentedMap()
        doc[section][key] = value
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def params_journal_path(params_path: Path) -> Path:
    """Where a run keeps params.yaml's original text while its overrides are in the file:
    beside the workspace lock, in DVC's git-ignored tmp directory."""
    return params_path.parent / LOCK_RELPATH.parent / f"dltrain-{params_path.name}.orig.json"


def recover_params(params_path: Path, logger: Any = None) -> bool:
    """Put back params.yaml after a run that died with its overrides in the file (its process
    was killed: no `finally` ran). Call it holding the workspace lock. True if restored."""
    journal = params_journal_path(params_path)
    try:
        record = json.loads(journal.read_text())
        original, written = record["original"], record["written"]
    except FileNotFoundError:
        return False
    except (ValueError, KeyError, TypeError):
        journal.unlink(missing_ok=True)  # unreadable: nothing it says can be trusted
        return False
    current = params_path.read_text()
    restored = current == written and current != original
    if restored:
        _write_keeping_mode(params_path, original)
        if logger is not None:
            logger.warning("a previous run ended without putting %s back (its process was "
                           "killed); restored it", params_path)
    elif current != original and logger is not None:
        logger.warning("a previous run ended without putting %s back, and the file was edited "
                       "since; leaving it as it is now", params_path)
    journal.unlink(missing_ok=True)
    return restored


@contextlib.contextmanager
def params_overridden(params_path: Path, overrides: dict[str, Any],
                      logger: Any = None) -> Iterator[None]:
    """Write `overrides` into params.yaml for the duration of the block, then put the file
    back, unless someone edited it meanwhile (their edit wins; we say so). A run killed
    before it could put the file back is repaired by the next one (recover_params)."""
    recover_params(params_path, logger)
    if not overrides:
        yield
        return
    original = params_path.read_text()
    written = render_overrides(original, overrides)
    journal = params_journal_path(params_path)
    journal.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(journal) as tmp:  # first: the file is never overridden unrecorded
        tmp.write_text(json.dumps({"original": original, "written": written}))
    _write_keeping_mode(params_path, written)
    try:
        yield
    finally:
        if params_path.read_text() == written:
            _write_keeping_mode(params_path, original)
        elif logger is not None:
            logger.warning("%s was edited during the run; leaving it as it is now",
                           params_path)
        journal.unlink(missing_ok=True)


def _write_keeping_mode(path: Path, text: str) -> None:
    """Replace `path` atomically, keeping its permission bits (mkstemp's are 0600)."""
    mode = path.stat().st_mode & 0o777
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        os.chmod(tmp, mode)
