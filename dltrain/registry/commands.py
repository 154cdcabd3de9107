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
    except (MlflowException, RequestException) as exc:
        raise _failed(uri, exc) from exc
    if model is None:
        raise RegistryError(f"no registered model {name} in {display_uri(uri)}")
    return history.read(model.tags or {})


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
