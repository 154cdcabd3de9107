"""Faults injected into real components: mirrors that corrupt, stall or drop (local HTTP
servers on 127.0.0.1), a disk that fills while outputs are written (a size-limited tmpfs), and
a training driver killed with its whole process group, then re-run.

Each test asserts what is left behind: data/raw and the outputs byte for byte as before, no
temporary file anywhere, a model that loads, every epoch listed once. RELIABILITY.md maps each
fault to its test.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

import dltrain.data.download as download_module
from dltrain import cli
from dltrain.atomic import atomic_open, read_json, write_json
from dltrain.data.datasets import DatasetSpec, RawFile
from dltrain.data.download import download
from dltrain.data.preprocess import preprocess
from dltrain.errors import DiskFullError, DownloadError, ModelError
from dltrain.model.mlp import MLP
from dltrain.model.torchio import load_model, save_model
from dltrain.paths import RAW_MANIFEST as MANIFEST_NAME

from helpers.data import RAW_FILES, make_processed, write_raw_dir
from helpers.mlflow import training_runs
from helpers.repo import venv_env
from helpers.sources import endless_source

NAMES = sorted(RAW_FILES.values())


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` and its bytes."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary files or directories of the atomic writers anywhere under `root`."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith((".tmp", ".part")) or ".old-" in p.name)


@pytest.fixture
def known_files(monkeypatch: pytest.MonkeyPatch, tiny_source: Path) -> Path:
    """The files of `tiny_source` become the data set's published ones (their md5s are the
    known checksums), so that a mirror serving anything else fails verification."""
    files = tuple(RawFile(n, hashlib.md5((tiny_source / n).read_bytes()).hexdigest(),
                          hashlib.md5(gzip.decompress((tiny_source / n).read_bytes())).hexdigest())
                  for n in NAMES)
    spec = DatasetSpec("fashion-mnist", files, (), ())
    monkeypatch.setattr(download_module, "get_spec", lambda name: spec)
    return tiny_source


# ----------------------------------------------------------------------------- mirrors

@dataclass
class Mirror:
    """One misbehaving mirror: `mode` is good, corrupt, stall (accepts, sends nothing),
    stall-body (headers and half the body, then nothing) or drop (closes mid-body)."""

    mode: str
    url: str = ""
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def mirrors(tiny_source: Path) -> Iterator[dict[str, Mirror]]:
    """One HTTP server on 127.0.0.1 per mode, each in a thread; stalled handlers are released
    and every server is stopped in teardown, pass or fail."""
    release = threading.Event()
    servers: list[http.server.ThreadingHTTPServer] = []
    found: dict[str, Mirror] = {}

    def handler_for(mirror: Mirror) -> type[http.server.BaseHTTPRequestHandler]:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                mirror.requests.append(self.path)
                data = (tiny_source / self.path.lstrip("/")).read_bytes()
                if mirror.mode == "stall":
                    release.wait(60)
                    return
                if mirror.mode == "corrupt":
                    data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + \
                        data[len(data) // 2 + 1:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if mirror.mode in ("stall-body", "drop"):
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    if mirror.mode == "stall-body":
                        release.wait(60)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    try:
        for mode in ("corrupt", "stall", "stall-body", "drop", "good"):
            mirror = Mirror(mode)
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_for(mirror))
            server.daemon_threads = True
            servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
            found[mode] = mirror
        yield found
    finally:
        release.set()
        for server in servers:
            server.shutdown()
            server.server_close()


BAD_MIRRORS = ("corrupt", "stall", "stall-body", "drop")
# A short read timeout: the stalling mirrors are abandoned in well under a second.
FAST = {"retries": 2, "backoff_s": 0.0, "timeout_s": 0.4, "progress": False}


def test_corrupt_stalling_and_dropping_mirrors_are_passed_over_for_the_next(
        tmp_path: Path, known_files: Path, mirrors: dict[str, Mirror],
        capsys: pytest.CaptureFixture[str]) -> None:
    ws = tmp_path / "ws"
    raw_dir = ws / "data" / "raw"
    order = [mirrors[m].url for m in (*BAD_MIRRORS, "good")]

    started = time.monotonic()
    manifest = download("fashion-mnist", None, raw_dir, mirrors=order, **FAST)
    elapsed = time.monotonic() - started

    # Every file came from the good mirror, verified, and nothing else is in data/raw.
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted([*NAMES, MANIFEST_NAME])
    for name in NAMES:
        assert (raw_dir / name).read_bytes() == (known_files / name).read_bytes()
        assert manifest["files"][name]["source"] == f"{mirrors['good'].url}/{name}"
        assert manifest["files"][name]["verified"] == "md5"
    # A wrong file is not retried; a stall or a drop is retried, then the next mirror is used.
    assert len(mirrors["corrupt"].requests) == 4
    for mode in ("stall", "stall-body", "drop"):
        assert len(mirrors[mode].requests) == 4 * FAST["retries"], mode
    assert leftovers(tmp_path) == []
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "timed out" in err
    assert "connection closed early" in err and "trying the next mirror" in err
    # The read timeout bounds each stalled attempt: 4 files x 2 stalling mirrors x 2 tries.
    assert elapsed < 4 * 2 * 2 * FAST["timeout_s"] + 10


def test_only_bad_mirrors_fail_naming_each_and_leave_raw_byte_for_byte(
        tmp_path: Path, known_files: Path, mirrors: dict[str, Mirror]) -> None:
    ws = tmp_path / "ws"
    raw_dir = write_raw_dir(ws / "data" / "raw", n_train=30, n_test=10, seed=9)  # older data
    before, listing = snapshot(raw_dir), sorted(p.name for p in (ws / "data").iterdir())

    with pytest.raises(DownloadError) as info:
        download("fashion-mnist", None, raw_dir, mirrors=[mirrors[m].url for m in BAD_MIRRORS],
                 **FAST)

    message = str(info.value)
    first = NAMES[0]  # the first file fetched, where every mirror failed
    for mode, reason in [("corrupt", "checksum mismatch"), ("stall", "timed out"),
                         ("stall-body", "timed out"), ("drop", "connection closed early")]:
        assert f"{mirrors[mode].url}/{first}: {reason}" in message, (mode, message)
    assert snapshot(raw_dir) == before
    assert sorted(p.name for p in (ws / "data").iterdir()) == listing
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- full disk

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[callable]:
    """mount(size) -> a directory on a tmpfs of that many bytes (root only); unmounted in
    teardown, pass or fail."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                               "tmpfs", str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                        "test_a_failed_write_mid_file_leaves_no_output covers the logic")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path, leave: int) -> None:
    """Fill the tmpfs holding `directory` until only about `leave` bytes are free."""
    free = shutil.disk_usage(directory).free
    (directory / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_preprocess_onto_a_full_disk_is_a_clear_error_and_keeps_the_old_outputs(
        tmp_path: Path, small_disk, capsys: pytest.CaptureFixture[str]) -> None:
    disk = small_disk(512 * 1024)
    small = tmp_path / "small"
    download("fashion-mnist", str(write_raw_dir(tmp_path / "s1", n_train=60, n_test=20)),
             small, progress=False)
    processed = disk / "data" / "processed"
    preprocess(small, processed, dataset="fashion-mnist", val_fraction=0.1, seed=0)
    before = snapshot(processed)
    big = tmp_path / "big"
    download("fashion-mnist", str(write_raw_dir(tmp_path / "s2", n_train=900, n_test=200)),
             big, progress=False)  # ~0.9 MB of arrays: more than the disk holds

    with pytest.raises(DiskFullError) as info:
        preprocess(big, processed, dataset="fashion-mnist", val_fraction=0.1, seed=0)

    message = str(info.value)
    assert "no space left" in message and str(processed) in message
    assert snapshot(processed) == before  # the old outputs, still valid
    assert sorted(p.name for p in disk.iterdir()) == ["data"]
    assert leftovers(disk) == []

    # The same through the CLI, in a workspace on its own small disk: one line naming the
    # path, exit 1, no traceback.
    size = sum(p.stat().st_size for p in big.iterdir())
    ws = small_disk(size + 64 * 1024)
    shutil.copytree(big, ws / "data" / "raw")
    (ws / "params.yaml").write_text("data:\n  dataset: fashion-mnist\n")
    inside = snapshot(ws)
    capsys.readouterr()
    assert cli.main(["preprocess", "--workspace", str(ws)]) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and str(ws / "data" / "processed") in err
    assert "Traceback" not in err
    assert snapshot(ws) == inside and leftovers(ws) == []


def test_download_onto_a_full_disk_stops_at_once_and_keeps_raw(
        tmp_path: Path, small_disk, known_files: Path, mirrors: dict[str, Mirror]) -> None:
    disk = small_disk(256 * 1024)
    raw_dir = disk / "raw"
    write_raw_dir(raw_dir, n_train=30, n_test=10, seed=9)
    before = snapshot(raw_dir)
    _fill(disk, leave=8 * 1024)  # room for less than one file

    with pytest.raises(DiskFullError) as info:
        download("fashion-mnist", None, raw_dir, mirrors=[mirrors["good"].url, str(known_files)],
                 **FAST)

    assert "no space left" in str(info.value) and str(raw_dir) in str(info.value)
    assert len(mirrors["good"].requests) == 1  # neither retried nor another mirror tried
    assert snapshot(raw_dir) == before
    assert leftovers(disk) == []


def test_a_source_file_that_may_not_fit_is_refused_before_writing(
        tmp_path: Path, small_disk, capsys: pytest.CaptureFixture[str]) -> None:
    # A source that sends no Content-Length may send up to data.max_file_bytes: on a disk with
    # less free than that, nothing is written (the old code wrote until the disk was full).
    ws = small_disk(4 << 20)
    (ws / "params.yaml").write_text("data:\n  dataset: fashion-mnist\n")
    write_raw_dir(ws / "data" / "raw", n_train=30, n_test=10, seed=9)
    before = snapshot(ws / "data")
    with endless_source(etag='"v1"') as source:
        code = cli.main(["download", "--workspace", str(ws), "-S", f"data.source={source.url}",
                         "-S", "data.max_file_bytes=16000000"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.count("\n") == 0, err
    assert "train-images-idx3-ubyte.gz" in err and "data.max_file_bytes" in err
    assert "free" in err and str(ws / "data" / "raw") in err
    assert snapshot(ws / "data") == before and leftovers(ws) == []


def _small_disk_with_a_model(small_disk) -> tuple[Path, Path, dict[str, bytes]]:
    """A 256 KiB tmpfs holding a saved 784-8-10 model: (disk, model.safetensors, models/ as
    it is)."""
    disk = small_disk(256 * 1024)
    model_path = disk / "models" / "model.safetensors"
    save_model(MLP((8,)).state_dict(), {"architecture": {"hidden_sizes": [8]}}, model_path)
    return disk, model_path, snapshot(disk / "models")


def test_model_and_json_writes_onto_a_full_disk_keep_the_previous_files(
        tmp_path: Path, small_disk) -> None:
    disk, model_path, before = _small_disk_with_a_model(small_disk)

    with pytest.raises(DiskFullError) as info:  # 784-512-10: 1.6 MB of weights
        save_model(MLP((512,)).state_dict(), {"architecture": {"hidden_sizes": [512]}},
                   model_path)
    assert "no space left" in str(info.value) and str(model_path) in str(info.value)
    assert snapshot(disk / "models") == before
    model, card = load_model(model_path)  # still the old, complete model
    assert card["architecture"]["hidden_sizes"] == [8]

    report = disk / "reports" / "training.json"
    write_json(report, {"epochs": [1]})
    _fill(disk, leave=4 * 1024)
    with pytest.raises(DiskFullError) as info:
        write_json(report, {"epochs": list(range(100_000))})
    assert str(report) in str(info.value)
    assert read_json(report) == {"epochs": [1]}
    assert leftovers(disk) == []


def test_a_full_disk_while_the_card_is_written_keeps_the_previous_pair(
        tmp_path: Path, small_disk) -> None:
    """The weights fit, their card does not: neither file is replaced."""
    disk, model_path, before = _small_disk_with_a_model(small_disk)
    _fill(disk, leave=96 * 1024)  # room for the 26 KB of weights, not for a 200 KB card

    with pytest.raises(DiskFullError) as info:
        save_model(MLP((8,)).state_dict(), {"architecture": {"hidden_sizes": [8]},
                                             "notes": "x" * 200_000}, model_path)
    assert "no space left" in str(info.value) and str(model_path) in str(info.value)
    assert snapshot(disk / "models") == before
    assert load_model(model_path)[1] == read_json(disk / "models" / "model.json")
    assert leftovers(disk) == []


def test_weights_and_card_from_different_saves_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the pair's two renames (injected: the second rename fails) leaves a
    card that is not the weights'; loading it is a clear error, and the next save repairs it."""
    model_path = tmp_path / "models" / "model.safetensors"
    save_model(MLP((8,)).state_dict(), {"architecture": {"hidden_sizes": [8]}}, model_path)
    old_weights = model_path.read_bytes()
    renames: list[str] = []
    real_replace = os.replace

    def crash_on_the_second(src, dst) -> None:
        renames.append(Path(dst).name)
        if len(renames) == 2:
            raise OSError(errno.EIO, "injected crash between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_second)
    with pytest.raises(OSError, match="injected crash"):
        save_model(MLP((8,)).state_dict(), {"architecture": {"hidden_sizes": [8]}}, model_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert renames == ["model.json", "model.safetensors"]  # the card first; not the weights
    assert model_path.read_bytes() == old_weights and leftovers(tmp_path) == []

    with pytest.raises(ModelError) as info:
        load_model(model_path)
    message = str(info.value)
    assert str(model_path) in message and "model.json" in message
    assert "sha256" in message and "re-run `dltrain train`" in message

    sha = save_model(MLP((8,)).state_dict(), {"architecture": {"hidden_sizes": [8]}},
                     model_path)
    assert load_model(model_path)[1]["weights_sha256"] == sha


def test_a_failed_write_mid_file_leaves_no_output(tmp_path: Path) -> None:
    """Where no tmpfs can be mounted: a write that fails with ENOSPC half way through."""
    target = tmp_path / "reports" / "metrics.json"
    write_json(target, {"accuracy": 0.9})
    with pytest.raises(DiskFullError) as info, atomic_open(target) as fh:
        fh.write('{"accuracy": 0.')
        fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "no space left" in str(info.value) and str(target) in str(info.value)
    assert read_json(target) == {"accuracy": 0.9}
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- killed driver

def _descendants(pid: int) -> set[psutil.Process]:
    try:
        return set(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(tree: set[psutil.Process], after: str, timeout_s: float = 30) -> float:
    """Seconds until every process in `tree` has exited on its own; a failure (and a kill,
    so nothing outlives the test) after `timeout_s`."""
    start = time.monotonic()
    try:
        while left := [p for p in tree if _alive(p)]:
            assert time.monotonic() - start < timeout_s, \
                f"still running {timeout_s:.0f} s {after}: {[p.name() for p in left]}"
            time.sleep(0.1)
    finally:
        for p in tree:
            if _alive(p):
                p.kill()
    took = time.monotonic() - start
    print(f"\n{len(tree)} processes of the driver gone {took:.1f} s {after}")
    return took


def _train_until_first_checkpoint(ws: Path, log: Path) -> tuple[subprocess.Popen, set]:
    """`dltrain train` in a session of its own, returned once a checkpoint exists (any epoch's:
    local mode keeps only the latest two, so the first may be gone by the next look), with its
    descendants (Ray's processes) as seen until then."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "dltrain", "train", "--workspace",
                                 str(ws)], env=venv_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    tree: set[psutil.Process] = set()
    deadline = time.monotonic() + 300
    while not list((ws / ".ray_results").glob("*/epoch_[0-9]*")):
        tree |= _descendants(proc.pid)
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.1)
    return proc, tree | _descendants(proc.pid)


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signalled_driver_stops_its_ray_and_says_interrupted(tmp_path: Path, sig) -> None:
    """Ctrl-C (SIGINT to the group, as a terminal or the stage guard sends it) or SIGTERM to the
    driver alone (a process manager): a "stopping" line at once, then exit 130 with
    "interrupted", and every Ray process gone."""
    ws = make_processed(tmp_path)
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [32]},
        "train": {"epochs": 200, "batch_size": 32, "num_workers": 1, "max_failures": 0}}))
    proc, tree = _train_until_first_checkpoint(ws, tmp_path / "train.log")
    try:
        assert any("RayTrainWorker" in p.name() for p in tree if _alive(p))
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        signalled = time.monotonic()
        assert proc.wait(timeout=60) == 130
        # Generous for a loaded machine; a driver that waits for Ray Train's controller to
        # abort (the controller answers once its worker group has started) takes longer.
        assert time.monotonic() - signalled < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _wait_gone(tree, f"after {sig.name}")
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert "dltrain train: interrupted" in lines
    # At once, what happens and where a re-run resumes; then the end.
    stopping = [i for i, line in enumerate(lines) if line.startswith("stopping")]
    assert len(stopping) == 1 and stopping[0] < lines.index("dltrain train: interrupted")
    assert f"stopping ({sig.name}): shutting down the private Ray" in lines[stopping[0]]
    assert "a re-run " in lines[stopping[0]]  # (the first epoch may be uncommitted yet)
    assert not (ws / "models" / "model.safetensors").exists()
    # Its MLflow run stays, marked interrupted, with the epochs it finished.
    runs, _ = training_runs(ws, None)
    assert [(r.info.status, r.data.tags["dltrain.training"]) for r in runs] == [
        ("KILLED", "interrupted")]


@pytest.mark.integration
def test_ctrl_c_in_local_mode_says_stopping_at_once_and_the_rerun_resumes(tmp_path: Path
                                                                          ) -> None:
    """Local mode (train.num_workers 0): Ctrl-C prints the stopping line, naming the epoch
    whose checkpoint stays, before the line exiting with 130; the re-run resumes from it.
    A few long epochs, not many tiny ones: the re-run trains every epoch left, and 400 tiny
    epochs (a checkpoint each) took the re-run past its 600 s on a loaded host."""
    ws = make_processed(tmp_path, n_train=12000, n_test=200)
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [256]},
        "train": {"epochs": 6, "batch_size": 32, "num_workers": 0}}))
    log = tmp_path / "train.log"
    proc, _ = _train_until_first_checkpoint(ws, log)
    seen_at = None
    try:
        os.killpg(proc.pid, signal.SIGINT)
        signalled = time.monotonic()
        while seen_at is None and time.monotonic() - signalled < 20:
            if "stopping (SIGINT)" in log.read_text():
                seen_at = time.monotonic() - signalled
            time.sleep(0.05)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = log.read_text().splitlines()
    assert seen_at is not None, lines[-5:]
    stopping = next(i for i, line in enumerate(lines) if line.startswith("stopping (SIGINT)"))
    assert stopping < lines.index("dltrain train: interrupted")
    assert "ending the training in this process" in lines[stopping]
    said = re.search(r"latest checkpoint \(epoch (\d+) or later\)", lines[stopping])
    assert said, lines[stopping]
    rerun = subprocess.run([sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)],
                           env=venv_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    resumed = re.search(r"resuming from the checkpoint of epoch (\d+):", rerun.stdout)
    assert resumed and int(resumed[1]) >= int(said[1]), rerun.stdout


@pytest.mark.integration
def test_killed_driver_then_rerun_resumes_cleanly_and_the_model_loads(tmp_path: Path) -> None:
    """SIGKILL the whole process group of `dltrain train` after its second checkpoint, then
    run the stage again: one run's epochs, each once, and a model that loads."""
    ws = make_processed(tmp_path, n_train=12000, n_test=200)
    epochs = 6
    (ws / "params.yaml").write_text(json.dumps({
        "model": {"hidden_sizes": [256]},
        "train": {"epochs": epochs, "batch_size": 32, "num_workers": 1, "max_failures": 0}}))
    cmd = [sys.executable, "-m", "dltrain", "train", "--workspace", str(ws)]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, env=venv_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    tree: set[psutil.Process] = set()
    try:
        deadline = time.monotonic() + 300
        while not list((ws / ".ray_results").glob("*/epoch_0002")):
            tree |= _descendants(proc.pid)
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no second checkpoint within 300 s"
            time.sleep(0.1)
        tree |= _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (ws / "models" / "model.safetensors").exists()  # killed before it finished
    # Ray starts its workers in sessions of their own, out of the group kill's reach; they
    # exit by themselves once their raylet is gone, so no orphan trains beside the re-run.
    _wait_gone(tree, "after a SIGKILL of the driver's group")

    rerun = subprocess.run(cmd, env=venv_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    report = json.loads((ws / "reports" / "training.json").read_text())
    numbers = [e["epoch"] for e in report["epochs"]]
    assert numbers == list(range(1, epochs + 1))  # every epoch once, in order
    attempts = [e["attempt"] for e in report["epochs"]]
    if report["resumed"]:  # continued: the first run's epochs, then the re-run's
        assert "resuming run" in rerun.stdout
        assert attempts[0] == 0 and attempts[-1] == 1 and attempts == sorted(attempts)
        assert attempts.count(0) >= 1
    else:  # restarted cleanly: every epoch from the re-run
        assert attempts == [0] * epochs
    model, card = load_model(ws / "models" / "model.safetensors")
    assert card["best_epoch"] in numbers
    assert load_file(ws / "models" / "model.safetensors").keys() == model.state_dict().keys()
    assert report["epochs"][-1]["val_accuracy"] >= 0.9
    run_dir = Path(report["storage_path"]) / report["run_name"]
    assert (run_dir / "dltrain-complete.json").is_file()
    # One MLflow run for the killed driver and the re-run, every epoch in it once.
    runs, history = training_runs(ws, report)
    assert runs == [report["mlflow"]["run_id"]]
    assert history == [(e["epoch"], pytest.approx(e["val_accuracy"])) for e in report["epochs"]]
