"""dltrain/data/freshness.py, the freshness check, with the download that follows it: a source that
did not change costs no download (and no body over HTTP), a changed one is noticed, and only the
files that changed are fetched. No network: directories, file:// URLs and an HTTP(S) server on
127.0.0.1 that each test starts and stops."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import http.server
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dltrain.data.freshness as freshness_module
from dltrain import cli
from dltrain.atomic import read_json
from dltrain.data.datasets import content_md5s
from dltrain.data.download import download
from dltrain.data.freshness import changed_files, check
from dltrain.errors import DataError, DownloadError
from dltrain.paths import RAW_MANIFEST as MANIFEST_NAME

from helpers.data import RAW_FILES, write_raw_dir
from helpers.repo import REPO_ROOT
from helpers.sources import endless_source, serving

NAMES = list(RAW_FILES.values())
FAST = {"backoff_s": 0.0, "timeout_s": 5.0, "progress": False}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replace_file(source: Path, name: str, seed: int) -> bytes:
    """Give `name` in `source` new content (another synthetic data set's file of that name)."""
    other = write_raw_dir(source.parent / f"other-{seed}", n_train=90, n_test=30, seed=seed)
    data = (other / name).read_bytes()
    (source / name).write_bytes(data)
    return data


# --- the known mirrors ---------------------------------------------------------------------

def test_known_mirrors_are_fingerprinted_by_their_published_checksums(tmp_path: Path):
    path = tmp_path / "data" / "source.json"
    first = check("fashion-mnist", None, path, progress=False)
    assert first.first and first.fingerprint["files"] == {
        n: {"content_md5": md5} for n, md5 in content_md5s("fashion-mnist").items()}
    assert read_json(path) == first.fingerprint
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns

    again = check("fashion-mnist", None, path, progress=False)
    assert again.unchanged and again.changed == ()
    # Not even rewritten: DVC sees the same file, and the download stays skipped.
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime

    other = check("mnist", None, path, progress=False)
    assert other.first and other.changed == tuple(NAMES)
    assert read_json(path)["id"] != first.fingerprint["id"]


def test_the_check_process_imports_no_torch_ray_or_mlflow(tmp_path: Path):
    """It runs on every `dvc repro`: the heavy libraries would cost seconds each time."""
    (tmp_path / "params.yaml").write_text("data:\n  dataset: fashion-mnist\n")
    code = ("import sys\nfrom dltrain.cli import main\n"
            f"assert main(['check', '--workspace', {str(tmp_path)!r}]) == 0\n"
            "heavy = sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow', 'numpy') "
            "if m in sys.modules)\nprint('heavy:', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "heavy: []" in proc.stdout
    assert (tmp_path / "data" / "source.json").is_file()


# --- a directory or file:// --------------------------------------------------------------

@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The names the check hashes, call by call."""
    calls: list[list[str]] = []
    real = freshness_module._hash_files

    def spy(directory, names, stats, *, progress):
        calls.append(list(names))
        return real(directory, names, stats, progress=progress)

    monkeypatch.setattr(freshness_module, "_hash_files", spy)
    return calls


@pytest.mark.parametrize("form", ["directory", "file-url"])
def test_a_local_source_is_hashed_once_then_only_stat_is_read(
        tmp_path: Path, tiny_source: Path, hashed: list[list[str]], form: str):
    source = str(tiny_source) if form == "directory" else tiny_source.as_uri()
    path, cache = tmp_path / "source.json", tmp_path / "stat.json"
    first = check("mnist", source, path, stat_cache_path=cache, progress=False)
    assert first.first
    assert first.fingerprint["files"] == {
        n: {"bytes": (tiny_source / n).stat().st_size,
            "sha256": sha256((tiny_source / n).read_bytes())} for n in NAMES}
    assert hashed == [NAMES]

    again = check("mnist", source, path, stat_cache_path=cache, progress=False)
    assert again.unchanged
    assert hashed == [NAMES]  # sizes and mtimes unchanged: nothing read


def test_a_touched_file_is_hashed_again_and_found_unchanged(
        tmp_path: Path, tiny_source: Path, hashed: list[list[str]]):
    path, cache = tmp_path / "source.json", tmp_path / "stat.json"
    check("mnist", str(tiny_source), path, stat_cache_path=cache, progress=False)
    before = path.read_bytes()
    name = RAW_FILES["train_labels"]
    st = (tiny_source / name).stat()
    os.utime(tiny_source / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    again = check("mnist", str(tiny_source), path, stat_cache_path=cache, progress=False)
    assert hashed[-1] == [name]  # only the touched file
    assert again.unchanged and path.read_bytes() == before


def test_a_replaced_file_is_a_change_named_in_the_result(
        tmp_path: Path, tiny_source: Path, capsys: pytest.CaptureFixture[str]):
    path, cache = tmp_path / "source.json", tmp_path / "stat.json"
    first = check("mnist", str(tiny_source), path, stat_cache_path=cache, progress=False)
    name = RAW_FILES["test_images"]
    data = replace_file(tiny_source, name, seed=5)

    again = check("mnist", str(tiny_source), path, stat_cache_path=cache, progress=False)
    assert again.changed == (name,) and not again.first
    assert again.fingerprint["files"][name] == {"bytes": len(data), "sha256": sha256(data)}
    assert read_json(path) == again.fingerprint
    assert changed_files(first.fingerprint, again.fingerprint) == [name]
    out = capsys.readouterr().out.splitlines()[-1]
    assert f"changed: {name}" in out and "download fetches 1 of 4 files" in out


def test_without_a_stat_cache_a_local_source_is_hashed_each_time(
        tmp_path: Path, tiny_source: Path, hashed: list[list[str]]):
    check("mnist", str(tiny_source), tmp_path / "source.json", progress=False)
    assert check("mnist", str(tiny_source), tmp_path / "source.json", progress=False).unchanged
    assert hashed == [NAMES, NAMES]


@pytest.mark.parametrize("defect, message", [
    ("missing file", "t10k-labels-idx1-ubyte.gz is missing"),
    ("no directory", "is not a directory"),
])
def test_a_source_without_its_files_is_a_clear_error_and_keeps_the_fingerprint(
        tmp_path: Path, tiny_source: Path, defect: str, message: str):
    path = tmp_path / "source.json"
    check("mnist", str(tiny_source), path, progress=False)
    before = path.read_bytes()
    if defect == "missing file":
        (tiny_source / "t10k-labels-idx1-ubyte.gz").unlink()
    else:
        shutil.rmtree(tiny_source)
    with pytest.raises(DataError, match=message):
        check("mnist", str(tiny_source), path, progress=False)
    assert path.read_bytes() == before


def test_cli_check_failure_is_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "params.yaml").write_text(f"data:\n  source: {tmp_path / 'nowhere'}\n")
    code = cli.main(["check", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.count("\n") == 0 and err.startswith("dltrain check: error: data.source ")
    assert "nowhere" in err and "is not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# --- the download after a check: only what changed -----------------------------------------

def test_download_fetches_only_the_files_the_check_found_changed(
        tmp_path: Path, tiny_source: Path, capsys: pytest.CaptureFixture[str]):
    raw_dir, path = tmp_path / "raw", tmp_path / "source.json"
    source = str(tiny_source)
    fingerprint = check("mnist", source, path, progress=False).fingerprint
    download("mnist", source, raw_dir, fingerprint=fingerprint, **FAST)
    capsys.readouterr()
    name = RAW_FILES["train_labels"]
    data = replace_file(tiny_source, name, seed=11)
    fingerprint = check("mnist", source, path, progress=False).fingerprint

    manifest = download("mnist", source, raw_dir, fingerprint=fingerprint, **FAST)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("download: ")]
    assert [n for n in NAMES if any(line.startswith(f"download: {n}  ") and f" from {source}/"
                                    in line for line in lines)] == [name]
    assert out.count("unchanged at the source; kept") == 3
    assert "fetched 1 of 4 files" in out
    assert (raw_dir / name).read_bytes() == data
    for n in NAMES:  # data/raw is the source, file for file
        assert (raw_dir / n).read_bytes() == (tiny_source / n).read_bytes()
        assert manifest["files"][n]["fingerprint"] == fingerprint["files"][n]
    assert read_json(raw_dir / MANIFEST_NAME) == manifest


def test_a_kept_file_that_was_edited_in_raw_is_fetched_again(tmp_path: Path,
                                                            tiny_source: Path):
    raw_dir, path = tmp_path / "raw", tmp_path / "source.json"
    fingerprint = check("mnist", str(tiny_source), path, progress=False).fingerprint
    download("mnist", str(tiny_source), raw_dir, fingerprint=fingerprint, **FAST)
    (raw_dir / RAW_FILES["test_labels"]).write_bytes(b"edited by hand")
    download("mnist", str(tiny_source), raw_dir, fingerprint=fingerprint, **FAST)
    for n in NAMES:
        assert (raw_dir / n).read_bytes() == (tiny_source / n).read_bytes()


# --- http(s):// on loopback ------------------------------------------------------------------

@dataclass
class Served:
    """One request the server answered: the conditional header it carried, the status, and
    how many bytes of body the server sent."""

    path: str
    if_none_match: str | None
    status: int
    body_bytes: int


@dataclass
class HttpSource:
    url: str
    root: Path
    log: list[Served] = field(default_factory=list)
    etags: bool = True  # False: a server that sends no validators at all


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, for an https:// source."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dltrain test source")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(params=["https", "http"])
def http_source(request: pytest.FixtureRequest, tmp_path: Path, tiny_source: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[HttpSource]:
    """`tiny_source` served on 127.0.0.1 with an ETag per file (the content's hash) and
    If-None-Match honoured; over TLS for https, its certificate trusted through SSL_CERT_FILE.
    Stopped in teardown, pass or fail."""
    state = HttpSource(url="", root=tiny_source)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            file = state.root / self.path.rsplit("/", 1)[-1]
            if not file.is_file():
                state.log.append(Served(self.path, None, 404, 0))
                self.send_error(404)
                return
            data = file.read_bytes()
            etag = f'"{sha256(data)[:20]}"'
            asked = self.headers.get("If-None-Match")
            # Logged before the answer goes out, so that the client never sees an answer
            # whose record is not in the log yet.
            if state.etags and asked == etag:
                state.log.append(Served(self.path, asked, 304, 0))
                self.send_response(304)
                self.send_header("ETag", etag)
                self.end_headers()
                return
            served = Served(self.path, asked, 200, 0)
            state.log.append(served)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            if state.etags:
                self.send_header("ETag", etag)
            self.end_headers()
            try:
                self.wfile.write(data)
                served.body_bytes = len(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client closed without reading: expected of the check

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if request.param == "https":
        cert, key = _self_signed(tmp_path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with serving(server) as port:
        state.url = f"{request.param}://127.0.0.1:{port}/data"
        yield state


def test_an_unchanged_etag_means_no_body_is_fetched(tmp_path: Path, http_source: HttpSource):
    path = tmp_path / "source.json"
    first = check("mnist", http_source.url, path, **FAST)
    assert first.first
    etags = {n: f'"{sha256((http_source.root / n).read_bytes())[:20]}"' for n in NAMES}
    assert first.fingerprint["files"] == {
        n: {"bytes": (http_source.root / n).stat().st_size, "etag": etags[n]} for n in NAMES}
    http_source.log.clear()

    again = check("mnist", http_source.url, path, **FAST)
    assert again.unchanged
    # One conditional request per file, each answered 304 Not Modified: no body sent at all.
    assert sorted(s.path for s in http_source.log) == sorted(f"/data/{n}" for n in NAMES)
    assert all(s.status == 304 and s.body_bytes == 0 for s in http_source.log)
    assert {s.path.rsplit("/", 1)[-1]: s.if_none_match for s in http_source.log} == etags


def test_a_new_etag_is_a_change_and_the_download_fetches_only_that_file(
        tmp_path: Path, http_source: HttpSource):
    raw_dir, path = tmp_path / "raw", tmp_path / "source.json"
    fingerprint = check("mnist", http_source.url, path, **FAST).fingerprint
    download("mnist", http_source.url, raw_dir, fingerprint=fingerprint, **FAST)
    name = RAW_FILES["train_images"]
    data = replace_file(http_source.root, name, seed=3)
    http_source.log.clear()

    result = check("mnist", http_source.url, path, **FAST)
    assert result.changed == (name,)
    assert [s.status for s in http_source.log if s.path.endswith(name)] == [200]
    http_source.log.clear()
    download("mnist", http_source.url, raw_dir, fingerprint=result.fingerprint, **FAST)
    assert [s.path for s in http_source.log] == [f"/data/{name}"]  # the one changed file
    assert (raw_dir / name).read_bytes() == data
    assert gzip.decompress((raw_dir / name).read_bytes())  # a whole file, not a stub


def test_a_server_without_validators_is_checked_by_content(tmp_path: Path,
                                                          http_source: HttpSource):
    http_source.etags = False
    path = tmp_path / "source.json"
    first = check("mnist", http_source.url, path, **FAST)
    assert first.fingerprint["files"][NAMES[0]] == {
        "bytes": (http_source.root / NAMES[0]).stat().st_size,
        "sha256": sha256((http_source.root / NAMES[0]).read_bytes())}
    assert check("mnist", http_source.url, path, **FAST).unchanged
    replace_file(http_source.root, NAMES[0], seed=8)
    assert check("mnist", http_source.url, path, **FAST).changed == (NAMES[0],)


def test_an_unreachable_or_missing_source_is_a_clear_error_and_keeps_the_fingerprint(
        tmp_path: Path, http_source: HttpSource):
    path = tmp_path / "source.json"
    check("mnist", http_source.url, path, **FAST)
    before = path.read_bytes()
    (http_source.root / RAW_FILES["test_labels"]).unlink()
    with pytest.raises(DownloadError, match=r"t10k-labels-idx1-ubyte\.gz: HTTP 404"):
        check("mnist", http_source.url, path, **FAST)
    assert path.read_bytes() == before


def test_a_server_that_refuses_is_retried_then_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/data"  # nothing listens there
    with pytest.raises(DownloadError, match=r"connection refused \(after 2 attempts\)"):
        check("mnist", url, tmp_path / "source.json", retries=2, **FAST)
    assert "retrying" in capsys.readouterr().err
    assert not (tmp_path / "source.json").exists()


def test_an_unreadable_source_file_is_a_clear_error(tmp_path: Path, tiny_source: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    def refuse(directory, names, stats, *, progress):
        raise PermissionError(13, "Permission denied", str(directory / names[0]))

    monkeypatch.setattr(freshness_module, "_hash_files", refuse)
    with pytest.raises(DataError, match=r"cannot read train-images-idx3-ubyte\.gz \(permission "
                                        r"denied\)"):
        check("mnist", str(tiny_source), tmp_path / "source.json", progress=False)
    assert not (tmp_path / "source.json").exists()


# --- a source without bounds: a deadline and a byte cap per file ----------------------------

def _check_cli(ws: Path, url: str, *settings: str) -> tuple[int, float]:
    (ws / "params.yaml").write_text("data:\n  dataset: mnist\n")
    started = time.monotonic()
    code = cli.main(["check", "--workspace", str(ws), "-S", f"data.source={url}",
                     *(arg for s in settings for arg in ("-S", s))])
    return code, time.monotonic() - started


def test_a_trickling_source_stops_the_check_at_its_deadline(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # One byte every 0.2 s and no validators: each read succeeds, so only a deadline on the
    # whole file ends it (the server itself stops after 30 s, which fails the test).
    with endless_source(trickle_s=0.2) as source:
        code, took = _check_cli(tmp_path, source.url, "data.download_timeout_s=2")
    err = capsys.readouterr().err.strip()
    assert code == 1 and took < 12, (code, took)
    assert err.count("\n") == 0, err
    assert err.startswith("dltrain check: error: data.source ")
    assert "train-images-idx3-ubyte.gz" in err and "data.download_timeout_s" in err
    assert len(source.requests) == 1  # a slow source is not asked again: the deadline holds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_an_endless_body_stops_the_check_at_the_byte_cap(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with endless_source() as source:
        code, took = _check_cli(tmp_path, source.url, "data.max_file_bytes=1000000")
    err = capsys.readouterr().err.strip()
    assert code == 1 and took < 12, (code, took)
    assert err.count("\n") == 0, err
    assert "more than 1000000 bytes" in err and "data.max_file_bytes" in err
    assert source.sent < 32 << 20  # read no further than the cap (plus what sockets buffer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
