"""Promotion: moving `champion` and `challenger` so that the end state is what the gate
(dltrain.registry.gate) decides for the registered versions, whatever the order in which concurrent
registrations ran, and recording every move (dltrain.registry.history).

MLflow has no compare-and-set on aliases, so a registration that reads the champion, decides
and writes can lose to another one doing the same. Two defences, one per kind of store:
- serialised (an SQLite store, the embedded default included): a file lock beside the database,
  one per model name, held from the duplicate check to the last alias move, so concurrent
  `dltrain register` runs take turns and each sees the versions of the others. It is an fcntl
  lock: the kernel drops it when its holder dies, so a killed run never leaves it stuck.
- reconciled (an MLflow server, which the registrations share no file with): after its moves,
  a registration lists the versions again and repeats until none appeared meanwhile. For one
  set of versions every registration writes the same aliases (gate.resolve depends on the
  versions and their recorded scores only, in the registry's version order), and the last one
  to write has seen every version, so the end state is the gate's.

Where the gate starts: the registered-model tag `dltrain.registry.gate.anchor` holds the champion
and challenger settled after version `as_of`. The versions above it that carry the gate's tags are
still to settle: normally only the one being registered; also one whose registration failed between
creating it and moving its alias (the re-run, or the next registration, finishes it), and on a
server those of registrations running at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dltrain.errors import RegistryError
from dltrain.registry import history
from dltrain.registry.gate import (
    CHALLENGER,
    CHAMPION,
    EPS,
    Member,
    Resolution,
    Score,
    Step,
    resolve,
)
from dltrain.registry.verify import fetch_checked
from dltrain.tracking.store import sqlite_path

ANCHOR_TAG = "dltrain.registry.gate.anchor"
# Version tags written at registration: the champion the version was compared with, and how.
BASE_TAG = "gate.champion_version"
BASE_ACCURACY_TAG = "gate.champion_accuracy"
LOCK_WAIT_S = 600.0
DESCRIPTION = "dltrain MLP on MNIST-style images (weights + model card)"


def error_code(exc: BaseException) -> str | None:
    """MLflow's documented error code of an MlflowException (e.g. RESOURCE_DOES_NOT_EXIST)."""
    return getattr(exc, "error_code", None)


@contextlib.contextmanager
def serialised(tracking_uri: str, model_name: str, *,
               wait_s: float = LOCK_WAIT_S) -> Iterator[bool]:
    """Hold the promotion lock of `model_name` in an SQLite store (True), or nothing for other
    stores (False: the caller reconciles instead)."""
    database = sqlite_path(tracking_uri)
    if database is None:
        yield False
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    safe_name = re.sub(r"[^\w.-]", "_", model_name)
    lock_path = database.parent / f".{database.name}.{safe_name}.lock"
    with open(lock_path, "a") as fh:
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"another registration of {model_name} has held {lock_path} for over "
                        f"{wait_s:.0f} s; wait for it to finish, then run this again") from None
                if not waiting:
                    print(f"register: waiting for another registration of {model_name} "
                          f"({lock_path})", flush=True)
                    waiting = True
                time.sleep(0.1)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- registry reads

def registered_model(client: Any, name: str) -> Any | None:
    """The registered model (with its aliases and tags), None when there is none. Any other
    error (a server answering 503, say) propagates: only "does not exist" means "none yet"."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    if registered_model(client, name) is not None:
        return
    try:
        client.create_registered_model(name, description=DESCRIPTION)
    except MlflowException as exc:
        if error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # a concurrent registration made it
            raise


def list_versions(client: Any, name: str, filter_extra: str = "") -> list[Any]:
    """Every version of `name` (with tags; search results carry no aliases), all pages."""
    found: list[Any] = []
    token = None
    while True:
        page = client.search_model_versions(f"name = '{name}'{filter_extra}", page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def alias_of(model: Any, alias: str) -> int | None:
    value = (model.aliases or {}).get(alias) if model is not None else None
    return None if value is None else int(value)


def _int(value: str | None) -> int | None:
    return None if value in (None, "", "none") else int(value)


def _float(value: str | None) -> float | None:
    return None if value in (None, "", "none") else float(value)


# ------------------------------------------------------------------------- the gate's records

@dataclass(frozen=True)
class Anchor:
    """The champion and challenger settled after version `as_of`."""

    as_of: int
    champion: int | None
    challenger: int | None


def read_anchor(model: Any | None, versions: list[Any]) -> Anchor:
    """The anchor tag; for a registry from before it (versions without the gate's tags), their
    versions and aliases count as settled."""
    text = (model.tags or {}).get(ANCHOR_TAG) if model is not None else None
    if text:
        try:
            data = json.loads(text)
            return Anchor(int(data["as_of"]), _int(data.get("champion")),
                          _int(data.get("challenger")))
        except (ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"registered model {model.name}: tag {ANCHOR_TAG} is not what "
                                f"dltrain wrote ({text[:80]!r}); delete the tag to rebuild it "
                                "from the aliases") from exc
    legacy = {int(v.version) for v in versions if BASE_TAG not in v.tags}
    settled = [alias_of(model, a) for a in (CHAMPION, CHALLENGER)]
    return Anchor(max(legacy, default=0), *(n if n in legacy else None for n in settled))


def gate_tags(base: Score | None, min_improvement: float, promote_unloadable: bool
              ) -> dict[str, str]:
    """The version tags that let any later registration redo this version's gate."""
    tags = {BASE_TAG: "none" if base is None else str(base.version),
            "gate.min_improvement": repr(min_improvement)}
    if base is not None:
        tags[BASE_ACCURACY_TAG] = "none" if base.accuracy is None else repr(base.accuracy)
        tags["gate.champion_rescored"] = str(base.rescored).lower()
        if base.own_accuracy is not None:
            tags["gate.champion_own_accuracy"] = repr(base.own_accuracy)
        if base.error:
            tags["gate.champion_error"] = base.error[:1000]
    if promote_unloadable:
        tags["gate.promote_unloadable"] = "true"
    return tags


def member(version: Any) -> Member | None:
    """A version registered with the gate's tags, as the gate sees it (None: registered
    before the gate kept them)."""
    tags = version.tags
    if BASE_TAG not in tags:
        return None
    base = _int(tags[BASE_TAG])
    base_score = None if base is None else Score(
        base, _float(tags.get(BASE_ACCURACY_TAG)), tags.get("gate.champion_rescored") == "true",
        _float(tags.get("gate.champion_own_accuracy")), tags.get("gate.champion_error"))
    return Member(int(version.version), float(tags["test_accuracy"]), tags["test_sha256"],
                  tags["weights_sha256"], float(tags["gate.min_improvement"]), base, base_score,
                  tags.get("gate.promote_unloadable") == "true")


# ----------------------------------------------------------------------------------- settling

Scorer = Callable[[int, Member], Score]


def settle(client: Any, name: str, score: Scorer, *, own: int | None, serialised: bool,
           max_rounds: int = 20) -> tuple[Resolution, list[history.Entry]]:
    """Move the aliases to what the gate decides for the versions still to settle; return the
    resolution and the history entries of the moves made. `own` is the version this
    registration is about (its moves are recorded as `register`, others' as `reconcile`)."""
    moved: list[history.Entry] = []
    for _ in range(max_rounds):
        model = client.get_registered_model(name)
        versions = {int(v.version): v for v in list_versions(client, name)}
        anchor = read_anchor(model, list(versions.values()))
        window = [m for n, v in versions.items() if n > anchor.as_of and (m := member(v))]
        resolution = resolve(anchor.champion, anchor.challenger, window, score)
        moved += _move(client, name, model, resolution, versions, own)
        latest = max(versions, default=0)
        if serialised or max((int(v.version) for v in list_versions(client, name)),
                             default=0) == latest:
            client.set_registered_model_tag(name, ANCHOR_TAG, json.dumps(
                {"as_of": latest, "champion": resolution.champion,
                 "challenger": resolution.challenger}))
            return resolution, moved
    raise RegistryError(f"new versions of {name} kept appearing while this registration "
                        f"settled its aliases ({max_rounds} rounds); run it again")


def _move(client: Any, name: str, model: Any, resolution: Resolution,
          versions: dict[int, Any], own: int | None) -> list[history.Entry]:
    """Set each alias the resolution changes. Each move's history entry is written before the
    alias, and taken back if the alias cannot be set: a move never goes unrecorded."""
    entries = []
    for alias, target in ((CHAMPION, resolution.champion), (CHALLENGER, resolution.challenger)):
        current = alias_of(model, alias)
        if current == target:
            continue
        entry = _entry(alias, current, target, resolution.moved_by.get(alias),
                       versions[target].tags if target in versions else {}, own)
        _recorded_move(client, name, entry)
        entries.append(entry)
    return entries


def _recorded_move(client: Any, name: str, entry: history.Entry) -> None:
    """Point entry.alias at entry.to_version (None: remove it), its history entry written
    first and taken back if the alias cannot be set: a move never goes unrecorded."""
    key = history.record(client, name, entry)
    try:
        if entry.to_version is None:
            client.delete_registered_model_alias(name, entry.alias)
        else:
            client.set_registered_model_alias(name, entry.alias, str(entry.to_version))
    except Exception:
        with contextlib.suppress(Exception):  # best effort: the original error matters
            history.erase(client, name, entry, key)
        raise


def _entry(alias: str, current: int | None, target: int | None, step: Step | None,
           tags: dict[str, str], own: int | None) -> history.Entry:
    """The history entry of moving `alias` from `current` to `target` because of `step`."""
    action = "register" if step is not None and step.member.version == own else "reconcile"
    scores = {"candidate_accuracy": _float(tags.get("test_accuracy")), "champion_accuracy": None}
    if step is None:
        reason = f"the gate's settled state has version {target} as {alias}"
    elif step.member.version == target:
        reason = step.reason
        scores["champion_accuracy"] = step.champion.accuracy if step.champion else None
    else:  # the champion that step.member displaced
        reason = f"displaced as champion by version {step.member.version}: {step.reason}"
        scores = {"candidate_accuracy": step.champion.accuracy if step.champion else None,
                  "champion_accuracy": step.member.accuracy}
    return history.Entry.now(
        alias=alias, from_version=current, to_version=target, action=action, reason=reason,
        test_sha256=step.member.test_sha256 if step else tags.get("test_sha256"),
        data_checksum=tags.get("data_checksum"), git_commit=tags.get("git_commit"), **scores)


# ----------------------------------------------------------------------------------- rollback

def previous_champion(entries: list[history.Entry], current: int) -> int | None:
    """The champion that `current` last took over from, whatever moved it (the gate, a
    reconciliation or a rollback): so a rollback is undone by the next one, and a version made
    champion by a rollback rolls back to the one it replaced. None when the history records
    none (`current` was the first champion)."""
    for entry in reversed(entries):
        if entry.alias == CHAMPION and entry.to_version == current:
            if entry.from_version is not None and entry.from_version != current:
                return entry.from_version
    return None


def rollback(client: Any, name: str, *, to: int | None, reason: str | None,
             min_accuracy: float, dataset: str, tracking_uri: str) -> history.Entry:
    """Move `champion` to version `to` (default: the champion the current one last replaced,
    from the readable entries of the history) and record the move. Refuses a
    version below `min_accuracy`, trained on another data set than `dataset`, or whose files
    fail predict's checks (dltrain.registry.verify: fetched and checked before the alias
    moves)."""
    from mlflow.exceptions import MlflowException

    model = registered_model(client, name)
    current = alias_of(model, CHAMPION)
    if model is None or current is None:
        raise RegistryError(f"{name} has no champion to roll back (register a model first)")
    if to is None:
        entries, unreadable = history.read(model.tags or {}, list_versions(client, name))
        to = previous_champion(entries, current)
        if to is None:
            skipped = (f" ({len(unreadable)} of its entries are unreadable: "
                       f"{', '.join(u.key for u in unreadable[:3])}"
                       f"{', ...' if len(unreadable) > 3 else ''})" if unreadable else "")
            raise RegistryError(f"the history of {name} records no champion before version "
                                f"{current}{skipped}; name the version: --to VERSION")
        for bad in unreadable:
            print(f"registry: {bad.describe()}", file=sys.stderr)
    if to == current:
        raise RegistryError(f"version {to} of {name} is already the champion")
    try:
        target = client.get_model_version(name, str(to))
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{name} has no version {to}") from exc
        raise
    tags = target.tags
    accuracy = _float(tags.get("test_accuracy"))
    if accuracy is None or accuracy + EPS < min_accuracy:
        raise RegistryError(f"version {to} of {name} has test accuracy {accuracy}, below "
                            f"register.min_accuracy {min_accuracy}: refused")
    if tags.get("dataset") != dataset:
        raise RegistryError(f"version {to} of {name} was trained on {tags.get('dataset')}, but "
                            f"the pipeline's data set is {dataset} (data.dataset): refused")
    with tempfile.TemporaryDirectory(prefix="dltrain-rollback-") as tmp:
        fetch_checked(target, tracking_uri, Path(tmp))  # VersionCheckError names the check
    anchor = read_anchor(model, list_versions(client, name))
    current_tags = client.get_model_version(name, str(current)).tags
    entry = history.Entry.now(
        alias=CHAMPION, from_version=current, to_version=to, action="rollback",
        reason=reason or "rolled back by hand", candidate_accuracy=accuracy,
        champion_accuracy=_float(current_tags.get("test_accuracy")),
        test_sha256=tags.get("test_sha256"), data_checksum=tags.get("data_checksum"),
        git_commit=tags.get("git_commit"))
    _recorded_move(client, name, entry)
    challenger = anchor.challenger
    if alias_of(model, CHALLENGER) == to:
        # The version rolled back to was the challenger: the one it replaces takes that place,
        # as a version displaced by a registration does; never one version with both aliases.
        displaced = history.Entry.now(
            alias=CHALLENGER, from_version=to, to_version=current, action="rollback",
            reason=f"displaced as champion by the rollback to version {to}",
            candidate_accuracy=_float(current_tags.get("test_accuracy")),
            champion_accuracy=accuracy, test_sha256=current_tags.get("test_sha256"),
            data_checksum=current_tags.get("data_checksum"),
            git_commit=current_tags.get("git_commit"))
        _recorded_move(client, name, displaced)
        challenger = current
    client.set_registered_model_tag(name, ANCHOR_TAG, json.dumps(
        {"as_of": anchor.as_of, "champion": to, "challenger": challenger}))
    return entry
