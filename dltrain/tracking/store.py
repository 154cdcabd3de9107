"""How dltrain reaches the MLflow tracking store and Model Registry: where it is, waiting for a
server with backoff, keeping MLflow quiet, and fetching a registered version's files.

Shared by the register stage (writes) and `dltrain predict` (reads models:/<name>@<alias>).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dltrain.errors import ModelError, RegistryError
from dltrain.paths import experiment_origin
from dltrain.urls import redact_text, redact_url

EXPERIMENT = "mnist-training"
MODEL_ARTIFACT_DIR = "model"  # the run folder of the loose files of versions registered before
_MODEL_REF = re.compile(r"^models:/(?P<name>[^@/]+)@(?P<alias>[\w-]+)$")


def embedded_tracking_uri(root: Path) -> str:
    """The default store: SQLite inside the repo, in the git-ignored mlruns/ (the repository's
    own for a DVC experiment run in a temporary copy: dltrain.paths.experiment_origin)."""
    return f"sqlite:///{experiment_origin(root).resolve() / 'mlruns' / 'mlflow.db'}"


def embedded_artifact_uri(root: Path) -> str:
    return (experiment_origin(root).resolve() / "mlruns" / "artifacts").as_uri()


def resolve_tracking_uri(configured: str | None, root: Path) -> str:
    """register.tracking_uri, else MLFLOW_TRACKING_URI, else the embedded SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(root)


def display_uri(uri: str) -> str:
    """The URI without a password, for messages and reports."""
    return redact_url(uri)


def redact(text: str, uri: str) -> str:
    """`text` (an error message that may quote the URI) without the URI's password."""
    return redact_text(text, uri)


def quiet_mlflow() -> None:
    """No database-migration logs, progress bars or run URLs on the console: one line per step
    is ours to print. Env defaults only, so a user's explicit setting still wins."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's own HTTP retries default to 7 with factor 2 (minutes of silence); our probe
    # below does the waiting, so a server that dies mid-run fails in seconds instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow sets its logger's level when first imported: set the env for that, then the
    # levels themselves in case it was imported already.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


class _LogFile(logging.FileHandler):
    """A log file that stays silent when it cannot be written (the disk that failed the
    registration may be the one it is on): `written` tells whether it holds this run's records."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.written = False
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)
        self.written = self.written or not self._failed

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's API
        self._failed = True  # instead of logging's "--- Logging error ---" on stderr


@contextlib.contextmanager
def mlflow_logs_to(path: Path) -> Iterator[Callable[[], bool]]:
    """While the block runs, what MLflow and its database migrations (alembic) log goes to
    the file `path` instead of the console: a failure of the store then reaches the console
    as the caller's one line, not as MLflow's tracebacks. Yields a function that tells whether
    the file received any of it (the line then names the file). Through logging's public API
    only: the loggers' handlers are swapped for the block and restored after it."""
    quiet_mlflow()  # MLflow imported, and its own console handler set up, before the swap
    path = Path(path)
    with contextlib.suppress(OSError):  # an unwritable folder: the handler stays silent
        path.parent.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(path)
    saved = {}
    for name in ("mlflow", "alembic"):
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.propagate)
        for old in saved[name][0]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield lambda: handler.written
    finally:
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            for old in handlers:
                logger.addHandler(old)
            logger.propagate = propagate
        handler.close()


def wait_for_server(uri: str, attempts: int, backoff_s: float) -> None:
    """For an http(s) tracking URI, probe the server's /health with exponential backoff;
    RegistryError naming the server and the fixes once every attempt failed."""
    if urllib.parse.urlsplit(uri).scheme not in ("http", "https"):
        return
    import requests

    last = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as exc:
            last = type(exc).__name__  # e.g. ConnectionError; the full text is noise
            continue
        if response.status_code < 500:
            return
        last = f"HTTP {response.status_code}"
    raise RegistryError(
        f"MLflow tracking server {display_uri(uri)} is unreachable after {attempts} attempts "
        f"(last error: {last}). Start it (`mlflow server --host 127.0.0.1 --port <port>`), "
        "or unset register.tracking_uri and MLFLOW_TRACKING_URI to use the embedded SQLite store. "
        "Nothing is lost: the model stays in models/ and a later `dvc repro` registers it.")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of an sqlite:/// URI, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


def connect(uri: str, *, attempts: int = 4, backoff_s: float = 1.0):
    """An MlflowClient on `uri` (tracking and registry), once the store is reachable."""
    quiet_mlflow()
    wait_for_server(uri, attempts, backoff_s)
    from mlflow import MlflowClient

    database = sqlite_path(uri)
    if database is not None:
        if database.exists():
            check_sqlite_store(database)
        else:
            database.parent.mkdir(parents=True, exist_ok=True)
    # An explicit client, never mlflow.set_tracking_uri: that one also exports
    # MLFLOW_TRACKING_URI, which would leak this store into every later resolution.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if database is not None:
        check_artifact_root(client, database)
    return client


def moved_artifact_root(client: Any, database: Path) -> Path | None:
    """For an embedded store (<workspace>/mlruns/mlflow.db), the artifact folder its experiment
    records when that is not the one beside the database: the workspace was moved or copied,
    and MLflow, which records absolute artifact paths, would read and write the old place.
    None when the store is not embedded, has no experiment yet, or is where it was made."""
    if database.name != "mlflow.db" or database.parent.name != "mlruns":
        return None
    experiment = client.get_experiment_by_name(EXPERIMENT)
    location = experiment.artifact_location if experiment is not None else ""
    if not location.startswith("file://"):
        return None
    recorded = Path(urllib.parse.unquote(urllib.parse.urlsplit(location).path))
    here = database.resolve().parent / "artifacts"
    # Only a folder that an embedded store made (mlruns/artifacts) is taken as moved: a store
    # that a user pointed at artifacts of their own elsewhere is theirs to keep so.
    if recorded == here or recorded.parts[-2:] != ("mlruns", "artifacts"):
        return None
    return recorded


def check_artifact_root(client: Any, database: Path) -> None:
    """RegistryError naming the cause and the fix when the embedded store was moved or
    copied (moved_artifact_root): nothing is read from or written to the old place."""
    recorded = moved_artifact_root(client, database)
    if recorded is None:
        return
    here = database.resolve().parent
    raise RegistryError(
        f"the MLflow store {database} records its artifacts in {recorded}, not beside it: the "
        f"workspace was moved or copied from {recorded.parent.parent}. Run `dltrain registry "
        f"relocate --workspace {here.parent}` to point it at {here / 'artifacts'} "
        "(nothing else changes); until then dltrain neither reads nor writes the old folder")


def check_sqlite_store(database: Path) -> None:
    """An existing SQLite store must be an MLflow store that SQLite can read whole: MLflow
    would otherwise fail with a SQLAlchemy traceback (a corrupt file), or, for a 0-byte file,
    silently make a fresh registry in it, and the next model would be "version 1 (champion)"
    of a registry that lost its history. A missing file is a new registry, as before."""
    import sqlite3

    fix = ("restore it from a backup, or move it away to start a new registry "
           "(its versions and aliases are then lost)")
    try:
        size = database.stat().st_size
        if not database.is_file():
            raise RegistryError(f"MLflow store {database} is not a file; {fix}")
        if size == 0:
            raise RegistryError(f"MLflow store {database} is empty (0 bytes), not a registry; "
                                f"{fix}")
        with open(database, "rb"):
            pass  # unreadable (permissions): the open says so
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            check = connection.execute("PRAGMA quick_check").fetchone()
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            connection.close()
    except OSError as exc:
        raise RegistryError(f"MLflow store {database} cannot be read "
                            f"({(exc.strerror or str(exc)).lower()}); {fix}") from exc
    except sqlite3.Error as exc:
        raise RegistryError(f"MLflow store {database} is corrupt: SQLite says \"{exc}\"; "
                            f"{fix}") from exc
    if not check or check[0] != "ok":
        raise RegistryError(f"MLflow store {database} is corrupt: SQLite's check says "
                            f"\"{check[0] if check else 'nothing'}\"; {fix}")
    if not {"experiments", "alembic_version"} <= tables:
        raise RegistryError(f"{database} is an SQLite file but not an MLflow store (no "
                            f"experiments or alembic_version table); {fix}")


def parse_model_ref(ref: str) -> tuple[str, str] | None:
    """models:/<name>@<alias> -> (name, alias); None when `ref` is not such a reference."""
    match = _MODEL_REF.match(ref)
    return (match["name"], match["alias"]) if match else None


def version_by_alias(ref: str, tracking_uri: str, *, attempts: int = 4,
                     backoff_s: float = 1.0) -> tuple[Any, Any]:
    """The client and the model version (with its tags) that `models:/<name>@<alias>` points
    to; its files are fetched and checked by dltrain.registry.verify."""
    parsed = parse_model_ref(ref)
    if parsed is None:
        raise ModelError(f"invalid model reference {ref!r}; expected models:/<name>@<alias>, "
                         "e.g. models:/mnist-mlp@champion, or a path to model.safetensors")
    name, alias = parsed
    database = sqlite_path(tracking_uri)
    if database is not None and not database.is_file():
        raise ModelError(f"no MLflow registry at {tracking_uri} (run `dltrain register` first, "
                         "or pass --tracking-uri)")
    client = connect(tracking_uri, attempts=attempts, backoff_s=backoff_s)
    from mlflow.exceptions import MlflowException

    try:
        return client, client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ModelError(f"{ref}: no such model version in {display_uri(tracking_uri)} "
                         f"({exc.message}); {_what_exists(client, name)}") from exc


def _what_exists(client: Any, name: str) -> str:
    """What a reference could name instead: the aliases of `name`, or the registered models."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = sorted((client.get_registered_model(name).aliases or {}).items())
    except MlflowException:
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=20))
        except MlflowException:
            return "the registry cannot list its models"
        return (f"registered models: {', '.join(names)}" if names
                else "the registry holds no model yet (run `dltrain register` first)")
    if not aliases:
        return f"{name} has no aliases"
    return f"aliases of {name}: " + ", ".join(f"@{a} (version {v})" for a, v in aliases)
