"""dltrain/data/download.py: sources, mirrors, verification, retries, and data/raw left exactly as
it was when anything fails. No network: mirrors are directories, file:// URLs and an HTTP server on
127.0.0.1 that the tests start and stop."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import pytest

import dltrain.data.download as download_module
from dltrain import cli
from dltrain.atomic import read_json, write_json
from dltrain.data.datasets import (
    DEBIAN_FASHION_MNIST_DIR,
    DatasetSpec,
    RawFile,
    get_spec,
)
from dltrain.data.download import data_checksum, download
from dltrain.errors import ConfigError, DownloadError
from dltrain.paths import RAW_MANIFEST as MANIFEST_NAME

from helpers.data import RAW_FILES, write_raw_dir
from helpers.sources import endless_source, serving

NAMES = sorted(RAW_FILES.values())
FAST = {"backoff_s": 0.0, "timeout_s": 5.0, "progress": False}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` and its bytes: to assert 'byte for byte as before'."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def spec_for(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], DatasetSpec]:
    """Make `download` treat the files of a directory as the data set's published ones (their
    md5s become the known checksums); the mirrors are passed by each test."""
    def make(reference: Path) -> DatasetSpec:
        files = tuple(RawFile(n, md5((reference / n).read_bytes()),
                              md5(gzip.decompress((reference / n).read_bytes())))
                      for n in RAW_FILES.values())
        spec = DatasetSpec("fashion-mnist", files, (), ())
        monkeypatch.setattr(download_module, "get_spec", lambda name: spec)
        return spec
    return make


def corrupt_copy(source: Path, dest: Path, name: str) -> Path:
    """A copy of `source` in which `name` has one byte flipped (same size, wrong md5)."""
    shutil.copytree(source, dest)
    data = bytearray((dest / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dest / name).write_bytes(bytes(data))
    return dest


def closed_port_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mirror"


# --- an HTTP mirror on 127.0.0.1 ---------------------------------------------------------------

@dataclass
class Server:
    url: str
    requests: list[str] = field(default_factory=list)
    # path -> HTTP status codes to answer, one per request, before serving the file
    fail: dict[str, list[int]] = field(default_factory=dict)
    on_request: Callable[[str], None] | None = None


@pytest.fixture
def http_mirror(tiny_source: Path) -> Iterator[Server]:
    """Serves `tiny_source` over HTTP on 127.0.0.1; stopped in teardown, pass or fail."""
    state = Server(url="")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            state.requests.append(self.path)
            if state.on_request is not None:
                state.on_request(self.path)
            codes = state.fail.get(self.path)
            if codes:
                self.send_error(codes.pop(0))
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass  # keep the test output clean

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(tiny_source)))
    with serving(server) as port:
        state.url = f"http://127.0.0.1:{port}"
        yield state


# --- the data sets ----------------------------------------------------------------------------

def test_fashion_mnist_tries_the_debian_directory_first_then_torchvisions_mirrors():
    from torchvision.datasets import MNIST, FashionMNIST

    spec = get_spec("fashion-mnist")
    assert spec.mirrors[0] == DEBIAN_FASHION_MNIST_DIR
    assert list(spec.mirrors[1:]) == FashionMNIST.mirrors
    assert {(f.name, f.md5) for f in spec.files} == set(FashionMNIST.resources)
    assert list(get_spec("mnist").mirrors) == MNIST.mirrors
    assert {(f.name, f.md5) for f in get_spec("mnist").files} == set(MNIST.resources)


def test_an_unknown_data_set_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="cifar"):
        download("cifar", None, tmp_path / "raw")


# --- data.source: computed, recorded, not checked ---------------------------------------------

def _assert_manifest_describes(raw_dir: Path, manifest: dict, source_files: Path) -> None:
    assert read_json(raw_dir / MANIFEST_NAME) == manifest
    assert sorted(manifest["files"]) == NAMES
    for name, entry in manifest["files"].items():
        data = (source_files / name).read_bytes()
        assert (raw_dir / name).read_bytes() == data
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["md5"] == md5(data)
        assert entry["bytes"] == len(data)
    assert manifest["checksum"] == data_checksum(
        {n: e["sha256"] for n, e in manifest["files"].items()})
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted([*NAMES, MANIFEST_NAME])


@pytest.mark.parametrize("form", ["directory", "file-url"])
def test_source_directory_or_file_url_records_checksums(tmp_path: Path, tiny_source: Path,
                                                       form: str):
    source = str(tiny_source) if form == "directory" else tiny_source.as_uri()
    raw_dir = tmp_path / "data" / "raw"
    manifest = download("mnist", source, raw_dir, **FAST)
    _assert_manifest_describes(raw_dir, manifest, tiny_source)
    assert manifest["dataset"] == "mnist"
    assert manifest["source"] == source
    for name, entry in manifest["files"].items():
        assert entry["verified"] is None  # recorded, not checked
        assert entry["source"].startswith(source) and entry["source"].endswith(name)
        # The version of the source file, as the freshness check records it: size and hash.
        assert entry["fingerprint"] == {"bytes": entry["bytes"], "sha256": entry["sha256"]}


def test_source_http_url(tmp_path: Path, tiny_source: Path, http_mirror: Server):
    raw_dir = tmp_path / "raw"
    manifest = download("fashion-mnist", http_mirror.url + "/", raw_dir, **FAST)
    _assert_manifest_describes(raw_dir, manifest, tiny_source)
    assert sorted(http_mirror.requests) == sorted(f"/{n}" for n in NAMES)
    for name, entry in manifest["files"].items():  # http.server sends Last-Modified
        mtime = (tiny_source / name).stat().st_mtime
        assert entry["fingerprint"] == {"bytes": entry["bytes"],
                                        "last_modified": formatdate(mtime, usegmt=True)}


def test_a_source_is_fetched_again_even_when_raw_is_complete(tmp_path: Path, tiny_source: Path):
    """Nothing vouches for a source's content, so data/raw follows it."""
    raw_dir = tmp_path / "raw"
    download("mnist", str(tiny_source), raw_dir, **FAST)
    other = write_raw_dir(tmp_path / "other", n_train=100, n_test=50, seed=7)
    manifest = download("mnist", str(other), raw_dir, **FAST)
    _assert_manifest_describes(raw_dir, manifest, other)


# --- known checksums and mirrors ---------------------------------------------------------------

def test_file_url_mirrors_are_verified_by_md5(tmp_path: Path, tiny_source: Path, spec_for,
                                             capsys: pytest.CaptureFixture[str]):
    spec_for(tiny_source)
    raw_dir = tmp_path / "raw"
    manifest = download("fashion-mnist", None, raw_dir, mirrors=[tiny_source.as_uri()], **FAST)
    _assert_manifest_describes(raw_dir, manifest, tiny_source)
    assert {e["verified"] for e in manifest["files"].values()} == {"md5"}
    assert manifest["source"] is None
    out = capsys.readouterr().out.splitlines()
    for name in NAMES:  # one readable line per file, saying where it came from
        assert sum(name in line and tiny_source.as_uri() in line for line in out) == 1


def test_same_data_in_another_gzip_wrapper_passes_on_the_content_md5(
        tmp_path: Path, tiny_source: Path, spec_for):
    """Debian's files carry the published data with a stripped gzip header: accepted."""
    spec_for(tiny_source)
    repacked = tmp_path / "repacked"
    repacked.mkdir()
    for name in NAMES:
        content = gzip.decompress((tiny_source / name).read_bytes())
        (repacked / name).write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
        assert md5((repacked / name).read_bytes()) != md5((tiny_source / name).read_bytes())
    manifest = download("fashion-mnist", None, tmp_path / "raw", mirrors=[str(repacked)], **FAST)
    assert {e["verified"] for e in manifest["files"].values()} == {"content-md5"}
    _assert_manifest_describes(tmp_path / "raw", manifest, repacked)


def test_corrupted_file_at_first_mirror_falls_back_to_the_next_while_raw_is_untouched(
        tmp_path: Path, tiny_source: Path, spec_for, http_mirror: Server,
        capsys: pytest.CaptureFixture[str]):
    spec_for(tiny_source)
    raw_dir = write_raw_dir(tmp_path / "raw", n_train=30, n_test=10, seed=9)  # an older download
    before = snapshot(raw_dir)
    seen_during_download = []
    http_mirror.on_request = lambda path: seen_during_download.append(snapshot(raw_dir))
    bad = corrupt_copy(tiny_source, tmp_path / "bad", "train-images-idx3-ubyte.gz")

    manifest = download("fashion-mnist", None, raw_dir, mirrors=[str(bad), http_mirror.url],
                        **FAST)

    assert http_mirror.requests == ["/train-images-idx3-ubyte.gz"]  # only the corrupt one
    assert seen_during_download == [before]
    files = manifest["files"]
    assert files["train-images-idx3-ubyte.gz"]["source"] == (
        http_mirror.url + "/train-images-idx3-ubyte.gz")
    assert files["train-labels-idx1-ubyte.gz"]["source"] == str(bad / "train-labels-idx1-ubyte.gz")
    _assert_manifest_describes(raw_dir, manifest, tiny_source)
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "trying the next mirror" in err


def test_unreachable_mirror_is_retried_then_the_next_mirror_is_used(
        tmp_path: Path, tiny_source: Path, spec_for, capsys: pytest.CaptureFixture[str]):
    spec_for(tiny_source)
    dead = closed_port_url()
    manifest = download("fashion-mnist", None, tmp_path / "raw",
                        mirrors=[dead, tiny_source.as_uri()], retries=2, **FAST)
    assert {e["source"].rsplit("/", 1)[0] for e in manifest["files"].values()} == {
        tiny_source.as_uri()}
    err = capsys.readouterr().err
    assert f"{dead}/train-images-idx3-ubyte.gz: connection refused; retrying" in err
    assert "trying the next mirror" in err


def test_server_errors_are_retried_with_backoff_on_the_same_mirror(
        tmp_path: Path, tiny_source: Path, spec_for, http_mirror: Server):
    spec_for(tiny_source)
    http_mirror.fail["/train-labels-idx1-ubyte.gz"] = [503, 500]
    manifest = download("fashion-mnist", None, tmp_path / "raw", mirrors=[http_mirror.url],
                        retries=3, backoff_s=0.01, progress=True)  # the bar's code path too
    assert http_mirror.requests.count("/train-labels-idx1-ubyte.gz") == 3
    assert manifest["files"]["train-labels-idx1-ubyte.gz"]["verified"] == "md5"


def test_not_found_is_not_retried(tmp_path: Path, tiny_source: Path, spec_for,
                                  http_mirror: Server):
    spec_for(tiny_source)
    download("fashion-mnist", None, tmp_path / "raw",
             mirrors=[http_mirror.url + "/missing", str(tiny_source)], retries=3, **FAST)
    assert len(http_mirror.requests) == 4  # one try per file, then the next mirror


def test_every_mirror_failing_lists_each_and_leaves_raw_byte_for_byte(
        tmp_path: Path, tiny_source: Path, spec_for, http_mirror: Server):
    spec_for(tiny_source)
    raw_dir = write_raw_dir(tmp_path / "data" / "raw", n_train=30, n_test=10, seed=9)
    (raw_dir / MANIFEST_NAME).write_text('{"dataset": "fashion-mnist"}\n')
    before, parent_before = snapshot(raw_dir), sorted(p.name for p in raw_dir.parent.iterdir())
    # The first two files come through; the third fails everywhere: the two must not land.
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(tiny_source / name, partial / name)
    bad = corrupt_copy(tiny_source, tmp_path / "bad", "t10k-images-idx3-ubyte.gz")
    http_mirror.fail["/t10k-images-idx3-ubyte.gz"] = [404]
    dead = closed_port_url()
    mirrors = [str(partial), dead, http_mirror.url, bad.as_uri()]

    with pytest.raises(DownloadError) as info:
        download("fashion-mnist", None, raw_dir, mirrors=mirrors, retries=2, **FAST)

    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in message
    for where, reason in [(partial, "file not found"), (dead, "connection refused"),
                          (http_mirror.url, "HTTP 404"), (bad.as_uri(), "checksum mismatch")]:
        assert any(f"{where}/t10k-images-idx3-ubyte.gz: {reason}" in line
                   for line in message.splitlines()), (where, reason, message)
    assert snapshot(raw_dir) == before
    assert sorted(p.name for p in raw_dir.parent.iterdir()) == parent_before  # no temp left


def test_cli_download_failure_exits_non_zero_naming_the_source(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "params.yaml").write_text(f"data:\n  source: {tmp_path / 'nowhere'}\n")
    code = cli.main(["download", "--workspace", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert str(tmp_path / "nowhere" / "train-images-idx3-ubyte.gz") in err
    assert "file not found" in err
    assert not (tmp_path / "data" / "raw").exists()


# --- already there -----------------------------------------------------------------------------

def test_verified_raw_dir_is_kept_without_fetching(tmp_path: Path, tiny_source: Path, spec_for,
                                                  capsys: pytest.CaptureFixture[str]):
    spec_for(tiny_source)
    raw_dir = tmp_path / "raw"
    first = download("fashion-mnist", None, raw_dir, mirrors=[str(tiny_source)], **FAST)
    before = snapshot(raw_dir)
    capsys.readouterr()
    # No mirror at all would fail if it were asked: it is not.
    again = download("fashion-mnist", None, raw_dir, mirrors=[closed_port_url()], **FAST)
    assert again == first and snapshot(raw_dir) == before
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["edited file", "other data set", "from a source"])
def test_raw_dir_that_is_not_verified_for_this_data_set_is_fetched_again(
        tmp_path: Path, tiny_source: Path, spec_for, change: str):
    spec_for(tiny_source)
    raw_dir = tmp_path / "raw"
    if change == "from a source":
        download("fashion-mnist", str(tiny_source), raw_dir, **FAST)
    else:
        download("fashion-mnist", None, raw_dir, mirrors=[str(tiny_source)], **FAST)
    if change == "edited file":
        (raw_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    if change == "other data set":
        manifest = read_json(raw_dir / MANIFEST_NAME)
        manifest["dataset"] = "mnist"
        write_json(raw_dir / MANIFEST_NAME, manifest)
    with pytest.raises(DownloadError):  # it did try to fetch: the only mirror is dead
        download("fashion-mnist", None, raw_dir, mirrors=[closed_port_url()], retries=1,
                 **FAST)
    manifest = download("fashion-mnist", None, raw_dir, mirrors=[str(tiny_source)], **FAST)
    _assert_manifest_describes(raw_dir, manifest, tiny_source)


# --- a source without bounds: a deadline and a byte cap per file ----------------------------

def _download_cli(ws: Path, url: str, *settings: str) -> tuple[int, float]:
    (ws / "params.yaml").write_text("data:\n  dataset: fashion-mnist\n")
    started = time.monotonic()
    code = cli.main(["download", "--workspace", str(ws), "-S", f"data.source={url}",
                     *(arg for s in settings for arg in ("-S", s))])
    return code, time.monotonic() - started


def _raw_with_data(ws: Path, tiny_source: Path) -> dict[str, bytes]:
    download("fashion-mnist", str(tiny_source), ws / "data" / "raw", progress=False)
    return snapshot(ws / "data")


def test_an_endless_body_stops_the_download_at_the_byte_cap_and_leaves_nothing(
        tmp_path: Path, tiny_source: Path, capsys: pytest.CaptureFixture[str]):
    # An ETag, so the check would not read the body: the download is what streams it.
    before = _raw_with_data(tmp_path, tiny_source)
    capsys.readouterr()
    with endless_source(etag='"v1"') as source:
        code, took = _download_cli(tmp_path, source.url, "data.max_file_bytes=1000000")
    err = capsys.readouterr().err.strip()
    assert code == 1 and took < 12, (code, took)
    assert err.count("\n") == 0, err
    assert err.startswith("dltrain download: error: ")
    assert "train-images-idx3-ubyte.gz" in err and "more than 1000000 bytes" in err
    assert "data.max_file_bytes" in err
    assert len(source.requests) == 1  # a file too big stays too big: not asked again
    assert source.sent < 32 << 20  # the cap, plus what the sockets buffer
    assert snapshot(tmp_path / "data") == before  # data/raw untouched
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]  # no .raw.*.tmp left


def test_a_trickling_source_stops_the_download_at_its_deadline(
        tmp_path: Path, tiny_source: Path, capsys: pytest.CaptureFixture[str]):
    before = _raw_with_data(tmp_path, tiny_source)
    capsys.readouterr()
    with endless_source(trickle_s=0.2, etag='"v1"') as source:
        code, took = _download_cli(tmp_path, source.url, "data.download_timeout_s=2")
    err = capsys.readouterr().err.strip()
    assert code == 1 and took < 12, (code, took)
    assert err.count("\n") == 0, err
    assert "train-images-idx3-ubyte.gz" in err and "data.download_timeout_s" in err
    assert len(source.requests) == 1
    assert snapshot(tmp_path / "data") == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]
