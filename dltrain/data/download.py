"""The download stage: fetch a data set's four IDX files into data/raw, verified.

Each file streams into a staging directory beside data/raw, is checked against its known md5,
and is kept only then; a mirror that fails is retried with backoff, then the next mirror is
tried. The four files and manifest.json are swapped in together at the end, so data/raw never
holds a partial or unverified file, and is left exactly as it was when anything fails.

From a `data.source`, only what changed is fetched: each file's manifest entry records the
version of the source file it came from (its `fingerprint`: size and sha256, or the HTTP
validators), and a file whose version is still the one the freshness check found
(data/source.json, dltrain/data/freshness.py) is kept from data/raw instead of fetched again.

Every file is bounded: its whole transfer must end within a deadline (`data.download_timeout_s`),
it may be no bigger than a cap (twice its published size for a known data set's file,
`data.max_file_bytes` for a data.source's), and it is written only when the disk holding data/raw
has room for it (its Content-Length, else the cap). A source that trickles, never ends its body
or would fill the disk fails in one line, and leaves nothing behind.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import netrc
import os
import shutil
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import IO, Any

from dltrain.atomic import atomic_dir, disk_full_error, is_disk_full, read_json, write_json
from dltrain.data.datasets import RAW_FILES, RawFile, check_dataset_name, get_spec
from dltrain.errors import DataError, DiskFullError, DownloadError
from dltrain.paths import RawFiles
from dltrain.urls import redact_text, redact_url

CHUNK = 1 << 20
# Some mirrors refuse urllib's default agent; torchvision sends its own name for the same reason.
USER_AGENT = "dltrain (+https://github.com/pytorch/vision)"
# The defaults of data.download_timeout_s and data.max_file_bytes (dltrain/config.py).
DEADLINE_S = 300.0
MAX_FILE_BYTES = 1 << 30


class _ChecksumError(Exception):
    """The bytes arrived but are not the expected file: try the next mirror, not this one again."""


class LimitError(Exception):
    """A file broke one of its bounds (its size cap, its deadline): asking the same source again
    would only repeat that, so it is never retried there."""


@dataclass(frozen=True)
class Limits:
    """The bounds on fetching one file."""

    deadline_s: float = DEADLINE_S  # the whole transfer, from the request to the last byte
    max_bytes: int = MAX_FILE_BYTES
    # The setting max_bytes comes from; None: the file's own bound (a known data set's file).
    cap_key: str | None = "data.max_file_bytes"

    def for_file(self, file: RawFile | str) -> Limits:
        """The limits of one file: a known file's own cap instead of data.max_file_bytes."""
        if isinstance(file, RawFile) and file.max_bytes is not None:
            return Limits(self.deadline_s, file.max_bytes, None)
        return self

    def read_timeout(self, timeout_s: float) -> float:
        """The timeout of each socket read: no longer than the whole deadline."""
        return min(timeout_s, self.deadline_s)

    def too_big(self, size: str) -> LimitError:
        rule = (f"the most {self.cap_key} allows (raise it if the file is really that big)"
                if self.cap_key else "twice the size this data set's file is published at")
        return LimitError(f"more than {self.max_bytes} bytes ({size}), {rule}")

    def too_slow(self) -> LimitError:
        return LimitError(f"not complete after {self.deadline_s:g} s, the time "
                          "data.download_timeout_s allows a file: the source is too slow or "
                          "never ends its body (raise it for a slow link)")

    def chunks(self, read: Callable[[int], bytes], deadline: float) -> Iterator[bytes]:
        """The body, chunk by chunk, until it ends; LimitError once it passes max_bytes or the
        deadline (a time.monotonic() value). `read` should be one socket read at a time
        (read1), so the deadline is checked however slowly the bytes come: read(n) waits until
        n bytes have arrived."""
        size = 0
        while chunk := read(CHUNK):
            size += len(chunk)
            if size > self.max_bytes:
                raise self.too_big("and still sending")
            if time.monotonic() > deadline:
                raise self.too_slow()
            yield chunk


@dataclass(frozen=True)
class _Fetched:
    md5: str
    sha256: str
    size: int
    headers: Message | None = None  # the HTTP response's, for its validators


def download(dataset: str, source: str | None, raw_dir: Path, *,
             mirrors: list[str] | None = None, retries: int = 3, backoff_s: float = 1.0,
             timeout_s: float = 30.0, progress: bool = True,
             fingerprint: dict[str, Any] | None = None,
             limits: Limits | None = None) -> dict[str, Any]:
    """Fetch `dataset`'s four IDX files into `raw_dir` and return the manifest written there.

    With `source` (a directory, file:// or http(s):// URL holding the four standard files) the
    files come from there and their checksums are computed and recorded, not checked; with
    `fingerprint` (what the freshness check found at the source, data/source.json) a file
    whose source version is unchanged since it was fetched is kept from `raw_dir`. Without
    `source` they come from `mirrors` (default: the data set's known list), each verified by
    md5. `timeout_s` bounds each read, `limits` each file (Limits). Raises DownloadError,
    naming every location tried and why it failed, when a file cannot be had, and
    DiskFullError when the disk has no room for a file; `raw_dir` is then unchanged.
    """
    check_dataset_name(dataset)
    raw_dir = Path(raw_dir)
    if retries < 1:
        raise ValueError("retries must be >= 1")
    if source is None:
        existing = _verified_manifest(raw_dir, dataset)
        if existing is not None:
            print(f"download: {dataset} already in {raw_dir} and verified; nothing to do")
            return existing
        spec = get_spec(dataset)
        files: list[RawFile | str] = list(spec.files)
        locations = list(mirrors) if mirrors is not None else list(spec.mirrors)
    else:
        files = list(RAW_FILES)
        locations = [source]
    kept = _unchanged_at_source(raw_dir, dataset, source, fingerprint) if source else {}
    if not locations:
        raise DownloadError(f"no mirror to download {dataset} from; set data.source to a "
                            "directory or URL holding the four IDX files")

    # All four files are staged and swapped in together: data/raw is never partial.
    with atomic_dir(raw_dir) as staging:
        entries = {}
        for file in files:
            name = _name(file)
            if name in kept:
                shutil.copyfile(raw_dir / name, staging / name)
                entries[name] = kept[name]
                print(f"download: {name}  unchanged at the source; kept from {raw_dir}")
                continue
            entries[name] = _fetch_file(file, locations, staging, retries=retries,
                                        backoff_s=backoff_s, timeout_s=timeout_s,
                                        progress=progress, output=raw_dir,
                                        limits=(limits or Limits()).for_file(file))
        manifest = {"dataset": dataset, "source": redact_url(source) if source else None,
                    "files": entries,
                    "checksum": data_checksum({n: e["sha256"] for n, e in entries.items()})}
        write_json(RawFiles(staging).manifest, manifest)
    fetched = f"; fetched {len(files) - len(kept)} of {len(files)} files" if kept else ""
    print(f"download: {dataset} ready in {raw_dir} (checksum {manifest['checksum'][:12]})"
          + fetched)
    return manifest


def data_checksum(sha256_by_name: dict[str, str]) -> str:
    """One checksum for the data set: sha256 over the files' hex sha256s, in sorted name order."""
    return hashlib.sha256("".join(sha256_by_name[n] for n in sorted(sha256_by_name))
                          .encode()).hexdigest()


def _name(file: RawFile | str) -> str:
    return file.name if isinstance(file, RawFile) else file


def source_version(headers: Message | None, size: int, sha256: str | None) -> dict[str, Any]:
    """What identifies one version of a source file, cheaply re-checkable: an HTTP response's
    validators (`ETag`, `Last-Modified`, with `Content-Length`) when the server sends any, else
    its size and content hash. The freshness check and the download record the same thing."""
    if headers is not None:
        validators = {key: headers.get(header) for key, header in
                      (("etag", "ETag"), ("last_modified", "Last-Modified"))
                      if headers.get(header)}
        if validators:
            return {"bytes": size, **validators}
    return {"bytes": size, "sha256": sha256}


# --- the quick path ---------------------------------------------------------------------------

def _verified_manifest(raw_dir: Path, dataset: str) -> dict[str, Any] | None:
    """The manifest of `raw_dir` if it holds the four md5-verified files of `dataset`,
    unchanged since (same size and sha256); else None."""
    try:
        manifest = read_json(RawFiles(raw_dir).manifest)
        files = manifest["files"]
        if manifest["dataset"] != dataset or set(files) != set(RAW_FILES):
            return None
        for name, entry in files.items():
            if entry.get("verified") not in ("md5", "content-md5"):
                return None
            path = raw_dir / name
            if path.stat().st_size != entry["bytes"] or _hash_file(path)[1] != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _unchanged_at_source(raw_dir: Path, dataset: str, source: str,
                         fingerprint: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The manifest entries of the files in `raw_dir` that came from `source` in the version
    `fingerprint` still lists, and are intact (same size and sha256): these need no fetch."""
    # Both files hold the source as shown (redacted), never a password.
    source = redact_url(source)
    if not fingerprint or fingerprint.get("dataset") != dataset \
            or fingerprint.get("source") != source:
        return {}
    try:
        manifest = read_json(RawFiles(raw_dir).manifest)
        if manifest["dataset"] != dataset or manifest["source"] != source:
            return {}
        kept = {}
        for name, entry in manifest["files"].items():
            version = entry.get("fingerprint")
            if name not in RAW_FILES or version is None \
                    or version != fingerprint["files"].get(name):
                continue
            path = raw_dir / name
            if path.stat().st_size == entry["bytes"] and _hash_file(path)[1] == entry["sha256"]:
                kept[name] = entry
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return kept


# --- one file, all mirrors --------------------------------------------------------------------

def _fetch_file(file: RawFile | str, locations: list[str], staging: Path, *, retries: int,
                backoff_s: float, timeout_s: float, progress: bool, output: Path,
                limits: Limits) -> dict[str, Any]:
    """Fetch one file from the first location that delivers it (verified when `file` carries
    checksums) into `staging` (beside `output`, data/raw); return its manifest entry."""
    name = _name(file)
    part = staging / f".{name}.part"
    failures: list[str] = []
    limited = False
    for index, location in enumerate(locations):
        where = join_location(location, name)
        for attempt in range(1, retries + 1):
            try:
                fetched = _fetch(where, part, timeout_s=timeout_s, progress=progress,
                                 limits=limits, output=output)
                verified = _verify(part, file, fetched) if isinstance(file, RawFile) else None
            except DiskFullError:
                part.unlink(missing_ok=True)  # our disk: no other mirror can help
                raise
            except (_ChecksumError, LimitError) as exc:
                # A wrong, endless or too slow file stays so on a retry: the next mirror.
                part.unlink(missing_ok=True)
                failures.append(redact_text(f"{where}: {exc}", where))
                limited = isinstance(exc, LimitError)
                break
            except Exception as exc:  # noqa: BLE001 - classified just below
                if is_disk_full(exc):
                    # Our disk, not the mirror: another mirror or a retry cannot help.
                    part.unlink(missing_ok=True)
                    raise disk_full_error(part, exc) from exc
                if not is_transient(exc) or attempt == retries:
                    failures.append(redact_text(f"{where}: {describe_error(exc)}", where)
                                    + (f" (after {attempt} attempts)" if attempt > 1 else ""))
                    break
                delay = backoff_s * 2 ** (attempt - 1)
                print(redact_text(f"download: {where}: {describe_error(exc)}; retrying in "
                                  f"{delay:g}s", where), file=sys.stderr)
                time.sleep(delay)
                continue
            os.replace(part, staging / name)
            check = {"md5": "md5 ok", "content-md5": "md5 of the content ok",
                     None: "checksums recorded"}[verified]
            print(f"download: {name}  {_human(fetched.size)}  from {redact_url(where)}  "
                  f"({check})")
            entry = {"md5": fetched.md5, "sha256": fetched.sha256, "bytes": fetched.size,
                     "source": redact_url(where), "verified": verified}
            if not isinstance(file, RawFile):  # from a data.source: which version it was
                entry["fingerprint"] = source_version(fetched.headers, fetched.size,
                                                      fetched.sha256)
            return entry
        if index < len(locations) - 1:
            print(f"download: {failures[-1]}; trying the next mirror", file=sys.stderr)
    part.unlink(missing_ok=True)
    hint = "Check the network, or set data.source to a directory or URL holding the four IDX files."
    if len(failures) == 1:  # one source (a data.source): one line
        raise DownloadError(f"could not download {name}: {failures[0]}"
                            + ("" if limited else f". {hint}"))
    raise DownloadError(f"could not download {name}: every mirror failed:\n  "
                        + "\n  ".join(failures) + f"\n{hint}")


def join_location(location: str, name: str) -> str:
    """Where `name` lives under a mirror: a URL for URLs, a plain path for directories."""
    scheme = urllib.parse.urlparse(location).scheme
    if scheme in ("http", "https", "file"):
        return location.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(location) / name)


def local_path(where: str) -> Path | None:
    """The file system path of a directory, file path or file:// URL; None for http(s)://.
    Raises DataError for any other URL scheme."""
    parsed = urllib.parse.urlparse(where)
    if parsed.scheme in ("http", "https"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme:
        raise DataError(f"unsupported URL scheme {parsed.scheme!r} in "
                        f"{redact_url(where)}; use a directory, file://, http:// or https://")
    return Path(where)


def open_url(url: str, headers: dict[str, str], timeout_s: float) -> Any:
    """urlopen `url`, with the login a netrc file (NETRC, else ~/.netrc) holds for its host:
    how an http(s) data.source is given credentials without writing them into params.yaml
    (and so dvc.lock). The login is sent to that host only, never along a redirect."""
    request = urllib.request.Request(url, headers=headers)
    login = _netrc_login(urllib.parse.urlsplit(url).hostname)
    if login is not None:
        token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return urllib.request.urlopen(request, timeout=timeout_s)


def _netrc_login(host: str | None) -> tuple[str, str] | None:
    if not host:
        return None
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        # None for ~/.netrc: Python then also refuses one that others can read.
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except FileNotFoundError:
        return None
    except (netrc.NetrcParseError, OSError) as exc:
        # The parser's message may quote the file's lines: name the file and line only.
        line = getattr(exc, "lineno", None)
        raise DataError(f"{path}: cannot be read as a netrc file"
                        + (f" (line {line})" if line else "")
                        + "; fix it (it must be readable by you alone) or remove it") from None
    return (entry[0], entry[2] or "") if entry else None


def _fetch(where: str, dest: Path, *, timeout_s: float, progress: bool, limits: Limits,
           output: Path) -> _Fetched:
    """Stream `where` into `dest`, hashing on the way, within `limits`; `output` (the folder
    `dest` is staged for) is what a lack of room names."""
    deadline = time.monotonic() + limits.deadline_s
    path = local_path(where)
    if path is None:
        with open_url(where, {"User-Agent": USER_AGENT},
                      limits.read_timeout(timeout_s)) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            _check_room(dest, output, total, limits)
            fetched = _copy(response, dest, total=total,
                            desc=Path(urllib.parse.urlparse(where).path).name,
                            progress=progress, limits=limits, deadline=deadline)
            return _Fetched(fetched.md5, fetched.sha256, fetched.size, response.headers)
    # A local copy is fast: no progress bar.
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        # A regular file's size is known; anything else (a pipe, a device) may be endless.
        _check_room(dest, output, st.st_size if stat.S_ISREG(st.st_mode) else None, limits)
        return _copy(fh, dest, total=None, desc=path.name, progress=False, limits=limits,
                     deadline=deadline)


def _check_room(dest: Path, output: Path, total: int | None, limits: Limits) -> None:
    """Refuse a file bigger than its cap, or one that may not fit on the disk of `dest`,
    before a byte of it is written: a download does not start what would fill the disk."""
    if total is not None and total > limits.max_bytes:
        raise limits.too_big(f"{total} announced")
    needed = total if total is not None else limits.max_bytes
    free = shutil.disk_usage(dest.parent).free
    if needed > free:
        why = ("its size" if total is not None
               else f"no size announced, so up to {limits.cap_key or 'its bound'}")
        lower = f" or lower {limits.cap_key}" if total is None and limits.cap_key else ""
        name = dest.name.removeprefix(".").removesuffix(".part")
        raise DiskFullError(f"no space left for {name} on the device holding {output}: it "
                            f"needs {_human(needed)} ({why}), {_human(free)} is free; nothing "
                            f"was written. Free some space (`df -h {output.parent}`){lower} "
                            "and re-run the stage.")


def _copy(stream: IO[bytes], dest: Path, *, total: int | None, desc: str, progress: bool,
          limits: Limits, deadline: float) -> _Fetched:
    from tqdm import tqdm

    md5, sha256, size = hashlib.md5(), hashlib.sha256(), 0
    read = getattr(stream, "read1", stream.read)  # a file:// or local stream has no read1
    # disable=None: tqdm draws only on a terminal, so CI logs get no bar spam.
    with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                       unit_divisor=1024, desc=desc, leave=False,
                                       disable=None if progress else True) as bar:
        for chunk in limits.chunks(read, deadline):
            size += len(chunk)
            out.write(chunk)
            md5.update(chunk)
            sha256.update(chunk)
            bar.update(len(chunk))
    if total is not None and size != total:
        raise http.client.IncompleteRead(b"", total - size)
    return _Fetched(md5.hexdigest(), sha256.hexdigest(), size)


def _verify(path: Path, file: RawFile, fetched: _Fetched) -> str:
    """'md5' if the archive is the published one; 'content-md5' if it is the same data in a
    different gzip wrapper (e.g. Debian's, which strips the file name and mtime)."""
    if fetched.md5 == file.md5:
        return "md5"
    content = hashlib.md5()
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                content.update(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise _ChecksumError(f"checksum mismatch: md5 {fetched.md5}, expected {file.md5}, "
                             f"and not a valid gzip file ({exc})") from exc
    if content.hexdigest() == file.content_md5:
        return "content-md5"
    raise _ChecksumError(f"checksum mismatch: md5 {fetched.md5}, expected {file.md5} "
                         f"(or content md5 {file.content_md5}, got {content.hexdigest()})")


def _hash_file(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


# --- failures ---------------------------------------------------------------------------------

def is_transient(exc: BaseException) -> bool:
    """Worth retrying on the same mirror: time-outs, refused or dropped connections, 5xx."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in (408, 429)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError, DataError)):
        return False
    return isinstance(exc, (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                            ConnectionError, OSError))


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return (describe_error(exc.reason) if isinstance(exc.reason, BaseException)
                else str(exc.reason))
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, http.client.IncompleteRead):
        return f"connection closed early ({exc.expected} bytes missing)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 ** 2:
        return f"{size / 1024:.1f} KB"
    if size < 1024 ** 3:
        return f"{size / 1024 ** 2:.1f} MB"
    return f"{size / 1024 ** 3:.1f} GB"
