"""The local Prefect stack: a Prefect server (SQLite, loopback) and a process worker for the
`dltrain-local` pool, in the background.

    python infra/prefect/stack.py up       # start both, wait until healthy, print the URLs
    python infra/prefect/stack.py down     # stop exactly what `up` started (its pid files)
    python infra/prefect/stack.py status

State lives in $PREFECT_HOME (default: <repo>/.prefect, git-ignored): the server's SQLite
database, and under stack/ the pid files and logs. The port is $PREFECT_SERVER_API_PORT
(default 4200). `make stack-up` / `make stack-down` call this.

`up` also makes the Prefect profile `dltrain-local`, with PREFECT_API_URL set to this server,
the active profile of the caller's `prefect` CLI (its profiles file: $PREFECT_HOME/profiles.toml,
Prefect's default ~/.prefect), so that `prefect deployment run ...` reaches the stack with no
export; without it the CLI silently runs against a temporary server of its own, where no worker
ever sees the run. `down` makes the profile that was active before `up` active again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.settings import ProfilesCollection

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
LOCAL_POOL = "dltrain-local"
PROFILE = "dltrain-local"
WORKER_NAME = "dltrain-local-worker"
# The server's start-up runs its database migrations and a UI build check: on a busy small
# machine that takes a while, and a timeout must not mistake it for a server that never comes.
START_TIMEOUT_S = float(os.environ.get("DLTRAIN_STACK_TIMEOUT_S", "180"))


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class Stack:
    home: Path
    port: int

    @classmethod
    def from_env(cls) -> Stack:
        home = Path(os.environ.get("PREFECT_HOME") or REPO_ROOT / ".prefect").resolve()
        return cls(home=home, port=int(os.environ.get("PREFECT_SERVER_API_PORT", DEFAULT_PORT)))

    @property
    def state_dir(self) -> Path:
        return self.home / "stack"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def pid_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    @property
    def previous_profile_path(self) -> Path:
        return self.state_dir / "previous-profile"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PREFECT_HOME=str(self.home), PREFECT_API_URL=self.api_url,
                   PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(self.port),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false")
        # `prefect deployment run --watch` prints the run's logs (an error's one line among
        # them) only when the server streams them out; Prefect's default is events only.
        env.setdefault("PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED", "true")
        env.setdefault("PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED", "true")
        # The worker's flow runs call `dvc` and `dltrain`: the venv's bin first on PATH.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env


def _prefect() -> str:
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.exists() else "prefect"


def read_pid(path: Path) -> int | None:
    """The pid in `path` if that process is alive and still a Prefect process, else None (a
    pid reused by an unrelated process must never be signalled)."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _is_prefect(pid) else None


def _is_prefect(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "prefect" for arg in argv[:2])


def _api(stack: Stack, method: str, path: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{stack.api_url}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"null")


def server_healthy(stack: Stack) -> bool:
    try:
        return _api(stack, "GET", "/health") is True
    except (OSError, ValueError):
        return False


def worker_online(stack: Stack) -> bool:
    """The worker has registered with the server and is sending heartbeats."""
    try:
        workers = _api(stack, "POST", f"/work_pools/{LOCAL_POOL}/workers/filter", {})
    except (OSError, ValueError):
        return False
    return any(w.get("name") == WORKER_NAME and w.get("status") == "ONLINE"
               for w in workers or [])


def _spawn(stack: Stack, name: str, args: list[str]) -> int:
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    with open(stack.log_path(name), "ab") as log:
        # A session of its own: `down` stops the process and its children as one group, and
        # the terminal's Ctrl-C does not reach it.
        proc = subprocess.Popen([_prefect(), *args], cwd=REPO_ROOT, env=stack.env(),
                                stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    # The child's command line shows once its exec has completed; read_pid checks it.
    deadline = time.monotonic() + 5
    while not _is_prefect(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stack.pid_path(name).write_text(f"{proc.pid}\n")
    return proc.pid


def _wait(what: str, ready, pid_path: Path, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        if read_pid(pid_path) is None:
            raise StackError(f"the {what} exited during start-up; see {log_path}")
        time.sleep(0.5)
    raise StackError(f"the {what} was not healthy after {START_TIMEOUT_S:.0f} s; see {log_path}")


@contextlib.contextmanager
def _profiles() -> Iterator[ProfilesCollection]:
    """The caller's Prefect profiles (its PREFECT_HOME or profiles path), read and then saved
    with Prefect's public profiles API, as its CLI sees them: PREFECT_API_URL and
    PREFECT_PROFILE, which would override the active profile, are left out meanwhile. In this
    process: a `prefect` command per step cost a Python start-up and Prefect's import each
    (`up` ran four, `down` three)."""
    hidden = {key: os.environ.pop(key) for key in ("PREFECT_API_URL", "PREFECT_PROFILE")
              if key in os.environ}
    try:
        from prefect.settings import load_profiles, save_profiles

        profiles = load_profiles()
        yield profiles
        save_profiles(profiles)
    except (OSError, ValueError) as exc:
        raise StackError(f"could not update the Prefect profiles: {exc}") from exc
    finally:
        os.environ.update(hidden)


def use_stack_profile(stack: Stack) -> None:
    """Make the profile PROFILE, pointing at this server, the CLI's active one; remember the
    profile it replaces (once: a second `up` keeps the first one's) for `down`."""
    with _profiles() as profiles:
        previous = profiles.active_name
        if previous and previous != PROFILE and not stack.previous_profile_path.exists():
            stack.state_dir.mkdir(parents=True, exist_ok=True)
            stack.previous_profile_path.write_text(f"{previous}\n")
        profiles.update_profile(PROFILE, {"PREFECT_API_URL": stack.api_url})
        profiles.set_active(PROFILE)


def restore_profile(stack: Stack) -> str | None:
    """Make the profile that was active before `up` active again, unless the user has chosen
    another one since (or removed it). Returns the profile restored."""
    try:
        previous = stack.previous_profile_path.read_text().strip()
    except OSError:
        return None
    restored = None
    if previous:
        with _profiles() as profiles:
            if profiles.active_name == PROFILE and previous in profiles.names:
                profiles.set_active(previous)
                restored = previous
    stack.previous_profile_path.unlink(missing_ok=True)
    return restored


def up(stack: Stack) -> None:
    server_pid, worker_pid = read_pid(stack.pid_path("server")), read_pid(stack.pid_path("worker"))
    if server_pid and worker_pid and server_healthy(stack) and worker_online(stack):
        print(f"the Prefect stack is already up (server pid {server_pid}, worker pid "
              f"{worker_pid})")
        use_stack_profile(stack)
        _print_urls(stack)
        return
    if server_pid is None:
        if server_healthy(stack):
            raise StackError(f"port {stack.port} already serves a Prefect API that this stack "
                             f"did not start; stop it or set PREFECT_SERVER_API_PORT")
        print(f"starting the Prefect server on {stack.ui_url} (log: {stack.log_path('server')})")
        _spawn(stack, "server", ["server", "start", "--host", HOST, "--port", str(stack.port)])
    try:
        _wait("server", lambda: server_healthy(stack), stack.pid_path("server"),
              stack.log_path("server"))
        if worker_pid is None:
            print(f"starting a process worker for pool {LOCAL_POOL} "
                  f"(log: {stack.log_path('worker')})")
            _spawn(stack, "worker", ["worker", "start", "--pool", LOCAL_POOL, "--type",
                                     "process", "--name", WORKER_NAME,
                                     "--install-policy", "never"])
        _wait("worker", lambda: worker_online(stack), stack.pid_path("worker"),
              stack.log_path("worker"))
        use_stack_profile(stack)
    except StackError:
        down(stack, quiet=True)
        raise
    print("the Prefect stack is up")
    _print_urls(stack)


def _print_urls(stack: Stack) -> None:
    print(f"  UI:  {stack.ui_url}\n  API: {stack.api_url}\n"
          f"  Prefect profile {PROFILE} is active (PREFECT_API_URL={stack.api_url}): the "
          "prefect CLI reaches this stack with no export; make stack-down restores the "
          "previous profile")


def _terminate(pid: int, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after `timeout_s`."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        # A zombie (exited, not yet reaped by its parent) counts as gone.
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def down(stack: Stack, quiet: bool = False) -> None:
    stopped = []
    for name in ("worker", "server"):  # the worker first: it needs the server to stop cleanly
        pid = read_pid(stack.pid_path(name))
        if pid is not None:
            _terminate(pid)
            stopped.append(f"{name} (pid {pid})")
        stack.pid_path(name).unlink(missing_ok=True)
    restored = restore_profile(stack)
    if not quiet:
        print("stopped " + " and ".join(stopped) if stopped else "the Prefect stack is not running")
        if restored:
            print(f"the Prefect profile {restored} is active again")


def status(stack: Stack) -> int:
    server, worker = read_pid(stack.pid_path("server")), read_pid(stack.pid_path("worker"))
    print(f"server: {'pid ' + str(server) if server else 'not running'}"
          f"{', healthy' if server and server_healthy(stack) else ''}")
    print(f"worker: {'pid ' + str(worker) if worker else 'not running'}"
          f"{', online' if worker and worker_online(stack) else ''}")
    return 0 if server and worker else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The local Prefect stack (server + worker).")
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    stack = Stack.from_env()
    try:
        if args.command == "up":
            up(stack)
        elif args.command == "down":
            down(stack)
        else:
            return status(stack)
    except StackError as exc:
        print(f"stack {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
