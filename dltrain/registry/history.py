"""Alias history: every move of `champion` or `challenger`, kept in the registry itself.

MLflow keeps no history of its aliases. Each move is one model-version tag,
`dltrain.registry.history.<epoch ns, 19 digits>.<8 hex digits>`, on the version it concerns (the
one the alias moves to; for an alias removed, the one it leaves), whose value is the entry as JSON:
- one tag per entry, so two registrations never overwrite each other's entry (one tag holding
  a list would need a read-modify-write, and lose an entry when two writers race);
- on the version, not the registered model: the UI shows a registered model's tags above its
  versions table, and one tag per move there would push the table off the page. A version's
  page shows the moves that concern it; `dltrain registry history` reads them all;
- the keys sort by time, across versions; the random suffix keeps two entries of one
  nanosecond apart;
- an entry is a few hundred characters, far below MLflow's limit on a tag value.
Registries written before keep their entries as registered-model tags of the same keys: `read`
takes both. A version deleted by hand takes its entries with it (MLflow deletes its tags).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Any

from dltrain.paths import FLOW_RUN_ID_ENV

HISTORY_PREFIX = "dltrain.registry.history."


@dataclass(frozen=True)
class Entry:
    """One alias move. `from_version` is None when the alias was not set before."""

    time: str  # ISO 8601, UTC
    alias: str
    from_version: int | None
    to_version: int | None
    action: str  # register | reconcile | rollback
    reason: str
    candidate_accuracy: float | None = None  # the version moved to, on its test set
    champion_accuracy: float | None = None  # the champion it was compared with, on that set
    test_sha256: str | None = None
    data_checksum: str | None = None
    git_commit: str | None = None
    flow_run_id: str | None = None

    @classmethod
    def now(cls, **values: Any) -> Entry:
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        return cls(time=stamp.replace("+00:00", "Z"),
                   flow_run_id=os.environ.get(FLOW_RUN_ID_ENV) or None, **values)

    @classmethod
    def from_json(cls, text: str) -> Entry:
        """The entry a tag holds; ValueError saying what is wrong when it is not one (any
        writer of the registry can leave a tag: by hand, another tool, a partial write)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise ValueError("not JSON") from None
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        for f in fields(cls):
            value = data.get(f.name)
            kinds = _KINDS[f.name]
            if (value is None and f.name in _REQUIRED) or not (
                    value is None or (isinstance(value, kinds) and not isinstance(value, bool))):
                raise ValueError(f"{f.name} is {_quote(value)}, not "
                                 f"{' or '.join(k.__name__ for k in kinds)}")
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


# What each field of an entry may hold (None too, except for the required ones).
_KINDS: dict[str, tuple[type, ...]] = {
    "time": (str,), "alias": (str,), "from_version": (int,), "to_version": (int,),
    "action": (str,), "reason": (str,), "candidate_accuracy": (int, float),
    "champion_accuracy": (int, float), "test_sha256": (str,), "data_checksum": (str,),
    "git_commit": (str,), "flow_run_id": (str,)}
_REQUIRED = ("time", "alias", "action", "reason")


def _quote(value: Any) -> str:
    return "missing" if value is None else repr(value)[:40]


@dataclass(frozen=True)
class Unreadable:
    """A history tag that holds no entry: named, never fatal. `version`: the model version
    whose tag it is (None: a registered-model tag)."""

    key: str
    why: str
    version: int | None = None

    def describe(self) -> str:
        where = f" (version {self.version})" if self.version is not None else ""
        return f"history entry {self.key}{where} is unreadable ({self.why}): skipped"


_last_ns = 0


def new_key() -> str:
    """A tag key later than every key this process made before (nanoseconds, so that two moves
    of one registration keep their order), unique across processes (the random suffix)."""
    global _last_ns
    _last_ns = max(time.time_ns(), _last_ns + 1)
    return f"{HISTORY_PREFIX}{_last_ns:019d}.{secrets.token_hex(4)}"


def version_of(entry: Entry) -> int:
    """The version whose tag holds `entry`: the one the alias moves to, else the one it leaves."""
    version = entry.to_version if entry.to_version is not None else entry.from_version
    if version is None:
        raise ValueError(f"{entry.alias} moves from no version to none: not a move")
    return version


def record(client: Any, name: str, entry: Entry) -> str:
    """Append `entry` to the history of registered model `name`; return its tag key."""
    key = new_key()
    client.set_model_version_tag(name, str(version_of(entry)), key, json.dumps(asdict(entry)))
    return key


def erase(client: Any, name: str, entry: Entry, key: str) -> None:
    """Take back the entry that record wrote under `key`."""
    client.delete_model_version_tag(name, str(version_of(entry)), key)


def read(model_tags: dict[str, str], versions: Iterable[Any] = ()
         ) -> tuple[list[Entry], list[Unreadable]]:
    """The history held in the tags of a registered model's versions (MLflow ModelVersion
    objects, with their tags) and, as older registries keep it, in the model's own tags, oldest
    first; and the history tags that hold no entry."""
    tagged: list[tuple[str, int | None, str]] = [
        (key, None, value) for key, value in (model_tags or {}).items()]
    for version in versions:
        tagged += [(key, int(version.version), value)
                   for key, value in (version.tags or {}).items()]
    found: list[Entry] = []
    unreadable: list[Unreadable] = []
    for key, version, value in sorted(tagged, key=lambda t: (t[0], t[1] or 0)):
        if key.startswith(HISTORY_PREFIX):
            try:
                found.append(Entry.from_json(value))
            except ValueError as exc:
                unreadable.append(Unreadable(key, str(exc), version))
    return found, unreadable


def entries(model_tags: dict[str, str], versions: Iterable[Any] = ()) -> list[Entry]:
    """The readable entries of the history (read), oldest first."""
    return read(model_tags, versions)[0]


def _cell(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)[:digits] if digits else str(value)


def table(history: list[Entry]) -> str:
    """The history as an aligned text table, one move per line, the reason last."""
    header = ("time", "alias", "move", "action", "accuracy", "champion", "test set", "commit",
              "flow run", "reason")
    rows = [(e.time, e.alias, f"{_cell(e.from_version)} -> {_cell(e.to_version)}", e.action,
             _cell(e.candidate_accuracy), _cell(e.champion_accuracy), _cell(e.test_sha256, 12),
             _cell(e.git_commit, 8), _cell(e.flow_run_id, 8), e.reason) for e in history]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)),
                                row[-1]]) for row in [header, *rows])
