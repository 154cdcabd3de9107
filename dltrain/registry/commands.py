"""`dltrain registry history` and `dltrain registry rollback`: the alias history that the
register stage keeps in the registry, read back and acted on."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dltrain.config import Params
from dltrain.errors import RegistryError
from dltrain.paths import Workspace
from dltrain.registry import history, promotion
from dltrain.tracking.store import connect, display_uri, redact, resolve_tracking_uri, sqlite_path


def _client(ws: Workspace, params: Params) -> tuple[Any, str]:
    uri = resolve_tracking_uri(params.register.tracking_uri, ws.root)
    database = sqlite_path(uri)
    if database is not None and not Path(database).is_file():
        raise RegistryError(f"no MLflow registry at {uri} (run `dltrain register` first, or set "
                            "register.tracking_uri / MLFLOW_TRACKING_URI)")
    return connect(uri), uri


def _failed(uri: str, exc: Exception) -> RegistryError:
    return RegistryError(f"MLflow at {display_uri(uri)} failed: {redact(str(exc), uri)}")


def load_history(ws: Workspace, params: Params
                 ) -> tuple[list[history.Entry], list[history.Unreadable]]:
    """The alias history of register.model_name, oldest first, and its unreadable tags."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    client, uri = _client(ws, params)
    name = params.register.model_name
    try:
        model = promotion.registered_model(client, name)
        if model is None:
            raise RegistryError(f"no registered model {name} in {display_uri(uri)}")
        return history.read(model.tags or {}, promotion.list_versions(client, name))
    except (MlflowException, RequestException) as exc:
        raise _failed(uri, exc) from exc


def show_history(ws: Workspace, params: Params, *, as_json: bool) -> list[history.Entry]:
    """Print the history (a table, or JSON on stdout); each unreadable entry is named in one
    line on stderr, and the rest is shown."""
    entries, unreadable = load_history(ws, params)
    for bad in unreadable:
        print(f"registry: {bad.describe()}", file=sys.stderr)
    if as_json:
        print(json.dumps([asdict(e) for e in entries], indent=2))
    elif entries:
        print(history.table(entries))
    else:
        print(f"no alias moves recorded for {params.register.model_name}")
    return entries


def rollback(ws: Workspace, params: Params, *, to: int | None,
             reason: str | None) -> history.Entry:
    """Move champion back (see promotion.rollback), under the same lock as registrations."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    client, uri = _client(ws, params)
    name = params.register.model_name
    with promotion.serialised(uri, name):
        try:
            entry = promotion.rollback(client, name, to=to, reason=reason,
                                       min_accuracy=params.register.min_accuracy,
                                       dataset=params.data.dataset, tracking_uri=uri)
        except (MlflowException, RequestException) as exc:
            raise _failed(uri, exc) from exc
    print(f"registry: {name} champion {entry.from_version} -> {entry.to_version} (rollback): "
          f"{entry.reason}")
    return entry


# Where MLflow's SQLite store records artifact locations (absolute URIs): every column that
# names a place in the artifact store. A column that a version of MLflow lacks is skipped.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("model_versions", "source"), ("model_versions", "storage_location"),
                    ("logged_models", "artifact_location"))


def relocate(ws: Workspace, params: Params) -> int:
    """Point the embedded store of a moved or copied workspace at the artifacts beside it:
    every recorded location under the old mlruns/artifacts is rewritten to the same place
    under this workspace's, in one SQLite transaction. Returns the number of records changed.

    MLflow records absolute artifact URIs and has no API to change those of existing runs and
    versions, so this rewrites the columns of LOCATION_COLUMNS directly, and only those."""
    import sqlite3

    from mlflow import MlflowClient

    from dltrain.tracking.store import (
        check_sqlite_store,
        embedded_artifact_uri,
        embedded_tracking_uri,
        moved_artifact_root,
        quiet_mlflow,
    )

    uri = resolve_tracking_uri(params.register.tracking_uri, ws.root)
    if uri != embedded_tracking_uri(ws.root):
        raise RegistryError(f"the tracking URI is {display_uri(uri)}, not this workspace's "
                            "embedded store: its artifacts are where that store says; "
                            "`dltrain registry relocate` rewrites only the embedded one")
    database = sqlite_path(uri)
    if database is None or not database.is_file():
        raise RegistryError(f"no MLflow registry at {uri} (nothing to relocate)")
    check_sqlite_store(database)
    quiet_mlflow()
    name = params.register.model_name
    with promotion.serialised(uri, name):
        # A plain client: dltrain's connect() refuses a moved store, which is what is fixed here.
        old = moved_artifact_root(MlflowClient(tracking_uri=uri, registry_uri=uri), database)
        if old is None:
            print(f"registry: {database} records its artifacts beside it already: "
                  "nothing to relocate")
            return 0
        old_uri, new_uri = old.as_uri(), embedded_artifact_uri(ws.root)
        connection = sqlite3.connect(database)
        try:
            with connection:  # one transaction: all of it or none
                changed = 0
                for table, column in LOCATION_COLUMNS:
                    present = {row[1] for row in connection.execute(
                        f"PRAGMA table_info({table})")}
                    if column not in present:
                        continue
                    changed += connection.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                        (new_uri, len(old_uri) + 1, old_uri, len(old_uri) + 1,
                         old_uri + "/")).rowcount
        except sqlite3.Error as exc:
            raise RegistryError(f"could not relocate {database}: SQLite says \"{exc}\"; "
                                "nothing was changed") from exc
        finally:
            connection.close()
    print(f"registry: {database} now records its artifacts in {new_uri} "
          f"({changed} records moved from {old_uri})")
    return changed
