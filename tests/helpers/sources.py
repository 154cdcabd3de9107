"""HTTP sources that never finish, served on 127.0.0.1: one that trickles a byte at a time and
one whose body never ends. Each is bounded by the test's own limits (a time and a byte count),
so a client without bounds makes the test fail instead of hanging it."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class EndlessSource:
    url: str
    requests: list[str] = field(default_factory=list)
    sent: int = 0  # bytes of body written, over every request


@contextlib.contextmanager
def endless_source(*, trickle_s: float | None = None, etag: str | None = None,
                   limit_s: float = 30.0, limit_bytes: int = 64 << 20
                   ) -> Iterator[EndlessSource]:
    """A server answering every GET with 200, no Content-Length, and a body that does not end:
    one byte each `trickle_s` seconds, or (None) 64 KiB blocks as fast as the client reads.
    Each body stops after `limit_s` seconds or `limit_bytes` bytes, whichever comes first,
    and at once when the test ends. `etag` gives the response that validator."""
    state = EndlessSource(url="")
    stop = threading.Event()
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the body ends only when the connection closes

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            with lock:
                state.requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if etag is not None:
                self.send_header("ETag", etag)
            self.end_headers()
            block = b"\x1f" if trickle_s is not None else b"\0" * (64 << 10)
            started, sent = time.monotonic(), 0
            try:
                while (not stop.is_set() and sent < limit_bytes
                       and time.monotonic() - started < limit_s):
                    self.wfile.write(block)
                    self.wfile.flush()
                    sent += len(block)
                    with lock:
                        state.sent += len(block)
                    if trickle_s is not None:
                        stop.wait(trickle_s)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up: what a bounded client does

        def log_message(self, *args: object) -> None:
            pass  # keep the test output clean

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with serving(server) as port:
        state.url = f"http://127.0.0.1:{port}/data"
        try:
            yield state
        finally:
            stop.set()  # ends the bodies still being sent, so the shutdown does not wait


@contextlib.contextmanager
def serving(server: http.server.HTTPServer) -> Iterator[int]:
    """Serve `server` from a thread while the block runs, then stop and close it, pass or
    fail; yields its port."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
