"""A local cache of registered versions' weights, so that `dltrain predict --model
models:/<name>@<alias>` does not pay for MLflow's import (2-3 s) on every call.

For the embedded SQLite store, what an alias pointed to is remembered together with a stamp of
the database file (size, mtime, ctime, inode; the same of its -journal and -wal files): while
the stamp is unchanged, nothing was written to the store, so the alias still points to the
same version, and the cached weights are used without asking MLflow. Any write to the store
(an alias moved by dltrain, by MLflow's UI or API, a rollback, a new run) changes the stamp,
and the next call asks MLflow again. Only file metadata is read, never the store's schema.

A stamp is recorded only when the file's last write is over STAMP_MARGIN_S old when it is
taken: a later write then always moves the mtime on, even where file timestamps are coarse.

The weights are cached by their sha256, checked again on every load (a cached file that changed
is fetched again). A tracking server is always asked which version the alias names, with one
request of its REST API (no MLflow import); its weights come from the cache when they are there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dltrain.atomic import atomic_dir, read_json, write_json
from dltrain.errors import DltrainError, ModelError, RegistryError
from dltrain.paths import ModelFiles, card_path_for
from dltrain.tracking.store import sqlite_path

STAMP_MARGIN_S = 2.0
CACHE_ENV = "DLTRAIN_MODEL_CACHE"  # where the cache of a tracking server's versions lives


def cache_root(tracking_uri: str) -> Path:
    """Beside the SQLite database (git-ignored mlruns/ by default); for a server, under
    $DLTRAIN_MODEL_CACHE or the user's cache directory, one folder per server."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        return db.parent / f".{db.name}.dltrain-cache"
    from dltrain.tracking.store import display_uri

    base = os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dltrain" / "registry"
    return Path(base) / hashlib.sha256(display_uri(tracking_uri).encode()).hexdigest()[:16]


def store_stamp(db: Path) -> list[list[int] | None]:
    """What changes whenever SQLite writes the database: its files' metadata."""
    stamp: list[list[int] | None] = []
    for path in (db, db.with_name(db.name + "-journal"), db.with_name(db.name + "-wal")):
        try:
            st = path.stat()
        except FileNotFoundError:
            stamp.append(None)
            continue
        stamp.append([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return stamp


def _settled(stamp: list[list[int] | None], taken_ns: int) -> bool:
    """Every file's last change is over STAMP_MARGIN_S before the stamp was taken."""
    return all(s is None or taken_ns - max(s[1], s[2]) > STAMP_MARGIN_S * 1e9 for s in stamp)


def _alias_file(root: Path, name: str, alias: str) -> Path:
    return root / "aliases" / (hashlib.sha256(f"{name}@{alias}".encode()).hexdigest()[:24]
                               + ".json")


def _weights_dir(root: Path, weights_sha256: str) -> Path:
    return root / "weights" / weights_sha256


def _load(folder: Path, weights_sha256: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The cached weights and card, if present and still the bytes the registry recorded."""
    from dltrain.model.weights import load_weights_and_digest

    path = ModelFiles(folder).weights
    if not path.is_file():
        return None
    try:
        state, card, digest = load_weights_and_digest(path)
    except ModelError:
        return None
    return (state, card) if digest == weights_sha256 else None


# MLflow's client settings for reaching a server (auth, TLS): with any of them set, the server
# is asked through MLflow's own client, which applies them.
_CLIENT_SETTINGS = ("MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS",
                    "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def served_weights_sha256(name: str, alias: str, tracking_uri: str) -> str | None:
    """The weights_sha256 tag of the version `alias` points to on a tracking server, asked with
    one request of MLflow's public REST API (GET registered-models/alias); None when that
    cannot answer (another store, client settings to apply, any error: MLflow's client then
    asks, with its retries and its messages)."""
    import json
    import urllib.parse
    import urllib.request

    if (urllib.parse.urlsplit(tracking_uri).scheme not in ("http", "https")
            or any(os.environ.get(k) for k in _CLIENT_SETTINGS)):
        return None
    url = (tracking_uri.rstrip("/") + "/api/2.0/mlflow/registered-models/alias?"
           + urllib.parse.urlencode({"name": name, "alias": alias}))
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            version = json.load(response)["model_version"]
        tags = {t["key"]: t["value"] for t in version.get("tags", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    sha = tags.get("weights_sha256")
    return sha if isinstance(sha, str) else None


def cached(ref_name: str, alias: str, tracking_uri: str
           ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The weights and card the alias points to, from the cache: for the SQLite store when it
    has not been written since the alias was resolved, for a server when it names weights
    that are cached; else None."""
    db = sqlite_path(tracking_uri)
    if db is None:
        sha = served_weights_sha256(ref_name, alias, tracking_uri)
        return None if sha is None else _load(_weights_dir(cache_root(tracking_uri), sha), sha)
    root = cache_root(tracking_uri)
    try:
        entry = read_json(_alias_file(root, ref_name, alias))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("stamp") != store_stamp(db):
        return None
    return _load(_weights_dir(root, str(entry.get("weights_sha256"))),
                 str(entry.get("weights_sha256")))


def fetch(ref: str, tracking_uri: str, *, attempts: int = 4, backoff_s: float = 1.0
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checked weights and card of the version `ref` (models:/<name>@<alias>) points to:
    from the cache when the store is unchanged, else resolved through MLflow, downloaded and
    checked against the registry (dltrain.registry.verify), and remembered. A cache that cannot
    be written costs speed only: one line on stderr, and the fetched model is used."""
    from dltrain.tracking.store import display_uri, parse_model_ref, redact, version_by_alias

    parsed = parse_model_ref(ref)
    if parsed is not None:
        hit = cached(*parsed, tracking_uri)
        if hit is not None:
            return hit
    from mlflow.exceptions import MlflowException  # a miss only: a hit imports no MLflow

    from dltrain.registry.verify import fetch_checked

    db = sqlite_path(tracking_uri)
    taken_ns = time.time_ns()
    before = store_stamp(db) if db is not None else None
    root = cache_root(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dltrain-predict-") as tmp:
        _client, version = version_by_alias(ref, tracking_uri, attempts=attempts,
                                           backoff_s=backoff_s)
        try:
            checked = fetch_checked(version, tracking_uri, Path(tmp))
        except MlflowException as exc:
            raise RegistryError(f"{ref} (version {version.version}): MLflow at "
                                f"{display_uri(tracking_uri)} failed while its files were "
                                f"fetched: {redact(str(exc), tracking_uri)}") from exc
        digest = checked.weights_sha256
        try:
            target = _weights_dir(root, digest)
            if _load(target, digest) is None:
                with atomic_dir(target) as staging:
                    copy = ModelFiles(staging)
                    shutil.copy2(checked.weights, copy.weights)
                    shutil.copy2(card_path_for(checked.weights), copy.card)
            # Remembered only if nothing wrote to the store meanwhile (an alias moving while
            # this call resolved it) and the stamp is settled (STAMP_MARGIN_S).
            if (parsed is not None and db is not None and store_stamp(db) == before
                    and _settled(before, taken_ns)):
                write_json(_alias_file(root, *parsed),
                           {"ref": ref, "stamp": before, "weights_sha256": digest})
        except (OSError, DltrainError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"predict: note: the model cache {root} cannot be written "
                  f"({' '.join(why.split())}); the model was fetched from MLflow, and will be "
                  "again on each call until the cache is repaired (remove it to reset it)",
                  file=sys.stderr, flush=True)
    return checked.state, checked.card
