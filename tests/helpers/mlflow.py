"""Test helpers: an empty MLflow SQLite store made once and copied where a test needs one, a
real `mlflow server` on loopback, and a fault-injecting HTTP proxy to put in front of it (an
error status for chosen requests, or a request held until the test releases it), so that
registry faults are injected into the real client and server."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# A rule sees (method, path, JSON body or None) and answers an HTTP status to fail the request
# with, an Event to hold it until set, or None to pass it on.
Rule = Callable[[str, str, dict | None], "int | threading.Event | None"]


@functools.cache
def _empty_store() -> Path:
    """An MLflow SQLite store that MLflow has created and migrated, holding nothing else; made
    once per test process (creating a store runs every schema migration, the slow part of a
    test's first MLflow call) and removed with the process' temporary directory."""
    from mlflow import MlflowClient

    folder = tempfile.TemporaryDirectory(prefix="mlflow-empty-")
    db = Path(folder.name) / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    _empty_store.folder = folder  # kept alive as long as the cache
    return db


def seed_store(db: Path) -> Path:
    """A copy of the empty migrated store at `db` (e.g. a workspace's mlruns/mlflow.db, the
    embedded store), as MLflow would create it on first use; an existing store is kept."""
    db = Path(db)
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_store(), db)
    return db


def seed_workspace_store(root: Path) -> Path:
    """The workspace's embedded store (mlruns/mlflow.db under `root`), seeded empty."""
    return seed_store(Path(root) / "mlruns" / "mlflow.db")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_mlflow(port: int, store: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1:`port` with its SQLite store in `store`; stopped
    when the block ends, pass or fail."""
    store.mkdir(exist_ok=True)
    seed_store(store / "mlflow.db")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


class FaultProxy:
    """A loopback proxy to `upstream` that applies `rules` to each request, first match wins,
    and records every request it saw as (method, path, body)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str, dict | None]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                proxy.forward(self, raw)

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def forward(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        parts = urllib.parse.urlsplit(handler.path)
        path = parts.path
        try:  # a POST's JSON body, or a GET's query
            body = json.loads(raw) if raw else dict(urllib.parse.parse_qsl(parts.query)) or None
        except ValueError:
            body = None
        self.seen.append((handler.command, path, body))
        for rule in list(self.rules):
            verdict = rule(handler.command, path, body)
            if isinstance(verdict, threading.Event):
                verdict.wait(timeout=120)
                break
            if verdict is not None:
                text = f"injected HTTP {verdict}".encode()
                handler.send_response(verdict)
                handler.send_header("Content-Type", "text/plain")
                handler.send_header("Content-Length", str(len(text)))
                handler.end_headers()
                handler.wfile.write(text)
                return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        headers = {k: v for k, v in handler.headers.items()
                   if k.lower() not in ("host", "connection", "content-length")}
        try:
            conn.request(handler.command, handler.path, body=raw or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def fail(method: str, path_end: str, status: int, model: str | None = None) -> Rule:
    """A rule: answer `status` to `method` requests whose path ends with `path_end` (and that
    name registered model `model`, in the body or the query, when given)."""
    def rule(m: str, path: str, body: dict | None) -> int | None:
        if m != method or not path.endswith(path_end):
            return None
        return status if model is None or (body or {}).get("name", model) == model else None

    return rule


def training_runs(ws_root: Path, report: dict | None) -> tuple[list, list[tuple[int, float]]]:
    """The runs in the workspace's embedded store (their ids; the runs themselves without a
    `report`), and the val_accuracy history (step, value) of the run that training.json
    (`report`) names: live tracking's outcome."""
    from mlflow import MlflowClient

    from dltrain.tracking.runs import EPOCH_MARK
    from dltrain.tracking.store import EXPERIMENT, embedded_tracking_uri

    client = MlflowClient(tracking_uri=embedded_tracking_uri(ws_root))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    if report is None:
        return runs, []
    runs = [r.info.run_id for r in runs]
    history = client.get_metric_history(report["mlflow"]["run_id"], EPOCH_MARK)
    return runs, sorted((m.step, m.value) for m in history)
