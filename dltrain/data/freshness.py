"""The freshness check: has the data source changed since the last run? Found out cheaply,
without downloading anything when it has not.

`dltrain check` (the `check` stage of dvc.yaml, which always runs) writes data/source.json, the
source's fingerprint. The file is deterministic (nothing of the run's time in it), so its bytes
change exactly when the data at the source changed; the download stage depends on it, so DVC
re-runs the download only then. Otherwise data/raw stays byte-identical and DVC skips
preprocess and every stage after it.

How each kind of source is fingerprinted:

- the known mirrors (`data.source: null`): the data set's published content md5s. A published
  data set does not change; a missing or edited data/raw is DVC's to notice (it is the download
  stage's output), and the download verifies what it fetches against the same md5s.
- a directory or file:// URL: each file's size and sha256. A file is hashed again only when its
  size, mtime, ctime or inode changed since the last check (a stat cache, kept where DVC keeps
  its own temporary state).
- http(s)://: each file's `ETag` / `Last-Modified` / `Content-Length`, asked with a conditional
  GET (`If-None-Match`, `If-Modified-Since`, from the last check): a 304 means unchanged and
  no body is sent; a 200 with validators is closed before its body is read. Only a server
  that sends no validators at all has its files streamed through a hash (not kept).

Each file is bounded as the download bounds it (dltrain.data.download.Limits): a file bigger
than `data.max_file_bytes`, or one whose transfer takes longer than `data.download_timeout_s`,
is a one-line error, never a check that runs until it is killed.

This module is run on every `dvc repro` and every flow run, so it stays light: the standard
library and dltrain's own small modules, never torch, ray or mlflow.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import stat
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dltrain.atomic import read_json, write_json
from dltrain.data.datasets import RAW_FILES, check_dataset_name, content_md5s
from dltrain.data.download import (
    CHUNK,
    USER_AGENT,
    LimitError,
    Limits,
    describe_error,
    is_transient,
    join_location,
    local_path,
    open_url,
    source_version,
)
from dltrain.errors import DataError, DownloadError
from dltrain.urls import redact_text, redact_url


@dataclass(frozen=True)
class Freshness:
    """What one check found."""

    fingerprint: dict[str, Any]  # as written to data/source.json
    changed: tuple[str, ...]  # files whose version differs from the last check's
    first: bool  # no earlier fingerprint of this data set and source

    @property
    def unchanged(self) -> bool:
        return not self.first and not self.changed


def check(dataset: str, source: str | None, fingerprint_path: Path, *,
          stat_cache_path: Path | None = None, retries: int = 3, backoff_s: float = 1.0,
          timeout_s: float = 30.0, progress: bool = True,
          limits: Limits | None = None) -> Freshness:
    """Fingerprint `dataset`'s four files at `source` (None: the known mirrors) and write it
    to `fingerprint_path` when it differs from the one there. Returns what changed.

    Raises DataError (a local source without its files, an unsupported URL) or DownloadError
    (an http(s) source that does not answer, after `retries` attempts with backoff, or a
    file that breaks `limits`); the fingerprint file is then left as it was.
    """
    check_dataset_name(dataset)
    if retries < 1:
        raise ValueError("retries must be >= 1")
    limits = limits or Limits()
    fingerprint_path = Path(fingerprint_path)
    previous = _read_fingerprint(fingerprint_path)
    # The source as shown and stored: a password in its URL is never written or printed.
    shown = redact_url(source) if source is not None else None
    same = previous if previous is not None and (previous["dataset"], previous["source"]) == (
        dataset, shown) else None
    before: dict[str, Any] = same["files"] if same else {}
    if source is None:
        files = {name: {"content_md5": md5} for name, md5 in content_md5s(dataset).items()}
    else:
        path = local_path(source)
        if path is None:
            files = _http_versions(source, before, retries=retries, backoff_s=backoff_s,
                                   timeout_s=timeout_s, limits=limits)
        else:
            files = _local_versions(shown, path, stat_cache_path, progress=progress,
                                    max_bytes=limits.max_bytes)
    body = {"dataset": dataset, "source": shown, "files": files}
    fingerprint = {**body, "id": _digest(body)}
    if fingerprint != previous:
        write_json(fingerprint_path, fingerprint)
    result = Freshness(fingerprint, tuple(n for n in RAW_FILES if files[n] != before.get(n)),
                       first=same is None)
    print(describe(result, previous))
    return result


def describe(result: Freshness, previous: dict[str, Any] | None = None) -> str:
    """One line: what was checked, and what changed."""
    fp = result.fingerprint
    where = (f"{fp['dataset']} from its known mirrors (published checksums)"
             if fp["source"] is None else f"data.source {fp['source']}")
    if result.first:
        return (f"check: {where}: fingerprint {fp['id'][:12]} recorded (the first for this "
                "data set and source)")
    if not result.changed:
        return f"check: {where} unchanged (fingerprint {fp['id'][:12]}); nothing to download"
    old = f"{previous['id'][:12]} -> " if previous else ""
    return (f"check: {where} changed: {', '.join(result.changed)} (fingerprint "
            f"{old}{fp['id'][:12]}); download fetches {len(result.changed)} of "
            f"{len(RAW_FILES)} files")


def changed_files(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[str]:
    """The files whose version differs between two fingerprints (all of them when the data
    set or the source differs, or one is missing)."""
    if not before or not after or (before.get("dataset"), before.get("source")) != (
            after.get("dataset"), after.get("source")):
        return list(RAW_FILES)
    return [n for n in RAW_FILES
            if before.get("files", {}).get(n) != after.get("files", {}).get(n)]


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_fingerprint(path: Path) -> dict[str, Any] | None:
    """The last check's fingerprint, or None when there is none (or it is unreadable: the
    check then starts afresh)."""
    try:
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("files"), dict) \
                and {"dataset", "source", "id"} <= set(data):
            return data
    except (OSError, ValueError):
        pass
    return None


# --- a directory or file:// -----------------------------------------------------------------

def _local_versions(source: str, directory: Path, stat_cache_path: Path | None, *,
                    progress: bool, max_bytes: int) -> dict[str, dict[str, Any]]:
    if not directory.is_dir():
        raise DataError(f"data.source {source}: {directory} is not a directory; it must be "
                        f"a directory (or file:// URL) holding the four IDX files "
                        f"({', '.join(RAW_FILES)})")
    cache = _read_stat_cache(stat_cache_path)
    stats: dict[str, os.stat_result] = {}
    for name in RAW_FILES:
        try:
            stats[name] = (directory / name).stat()
        except FileNotFoundError:
            raise DataError(f"data.source {source}: {name} is missing; the source must hold "
                            f"the four IDX files ({', '.join(RAW_FILES)})") from None
        except OSError as exc:
            raise DataError(f"data.source {source}: cannot read {name} "
                            f"({describe_error(exc)})") from exc
        if not stat.S_ISREG(stats[name].st_mode) or stats[name].st_size > max_bytes:
            # Not a regular file (a pipe, a device: maybe endless), or bigger than the cap.
            raise DataError(f"data.source {source}: {name} is not a regular file of at most "
                            f"{max_bytes} bytes (data.max_file_bytes)")
    keys = {n: _stat_key(stats[n]) for n in RAW_FILES}
    known = {n: cache[str(directory / n)]["sha256"] for n in RAW_FILES
             if cache.get(str(directory / n), {}).get("stat") == keys[n]}
    to_hash = [n for n in RAW_FILES if n not in known]
    if to_hash:
        try:
            known.update(_hash_files(directory, to_hash, stats, progress=progress))
        except OSError as exc:
            raise DataError(f"data.source {source}: cannot read "
                            f"{Path(exc.filename or '').name or 'a file'} "
                            f"({describe_error(exc)})") from exc
        for name in to_hash:
            cache[str(directory / name)] = {"stat": keys[name], "sha256": known[name]}
        _write_stat_cache(stat_cache_path, cache)
    return {n: {"bytes": stats[n].st_size, "sha256": known[n]} for n in RAW_FILES}


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime cannot be set back by a user (mtime can: `cp -p`, `touch -d`), and a replaced file
    # has a new inode: either one changing means "hash again".
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _hash_files(directory: Path, names: list[str], stats: dict[str, os.stat_result], *,
                progress: bool) -> dict[str, str]:
    from tqdm import tqdm  # only when there is something to hash

    digests = {}
    total = sum(stats[n].st_size for n in names)
    # disable=None: tqdm draws only on a terminal, so CI logs get no bar spam.
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              desc="check: hashing the source", disable=None if progress else True) as bar:
        for name in names:
            sha256 = hashlib.sha256()
            with open(directory / name, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    sha256.update(chunk)
                    bar.update(len(chunk))
            digests[name] = sha256.hexdigest()
    return digests


def _read_stat_cache(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stat_cache(path: Path | None, cache: dict[str, Any]) -> None:
    # Only a speed-up: a cache that cannot be written means hashing again next time.
    if path is None:
        return
    try:
        write_json(path, cache)
    except OSError as exc:
        print(f"check: note: could not keep the stat cache {path} ({exc.strerror})",
              file=sys.stderr)


# --- http(s):// -----------------------------------------------------------------------------

def _http_versions(source: str, before: dict[str, Any], *, retries: int, backoff_s: float,
                   timeout_s: float, limits: Limits) -> dict[str, dict[str, Any]]:
    return {name: _http_version(join_location(source, name), before.get(name), retries=retries,
                                backoff_s=backoff_s, timeout_s=timeout_s, limits=limits)
            for name in RAW_FILES}


def _http_version(url: str, before: dict[str, Any] | None, *, retries: int, backoff_s: float,
                  timeout_s: float, limits: Limits) -> dict[str, Any]:
    """The version of the file at `url`: `before` if the server says it is unchanged."""
    headers = {"User-Agent": USER_AGENT}
    if before and before.get("etag"):
        headers["If-None-Match"] = before["etag"]
    if before and before.get("last_modified"):
        headers["If-Modified-Since"] = before["last_modified"]
    for attempt in range(1, retries + 1):
        deadline = time.monotonic() + limits.deadline_s
        try:
            with open_url(url, headers, limits.read_timeout(timeout_s)) as response:
                length = response.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > limits.max_bytes:
                    raise limits.too_big(f"{length} announced")
                version = source_version(response.headers, int(length) if length else None,
                                         None)
                if "sha256" in version:
                    # No validators: only the content itself tells a change.
                    version = _hash_body(response, limits, deadline)
                # With validators, the body is never read: closing the response drops it.
                return version
        except LimitError as exc:
            # Too big or too slow stays so when asked again: one line, no retry.
            raise DownloadError(redact_text(
                f"data.source {url}: {exc}; the freshness check stopped reading it", url)
            ) from None
        except urllib.error.HTTPError as exc:
            if exc.code == 304 and before is not None:  # Not Modified: no body was sent
                return before
            error: Exception = exc
        except (OSError, ValueError, http.client.HTTPException) as exc:
            error = exc  # unreachable, timed out, dropped, a malformed answer
        if not is_transient(error) or attempt == retries:
            tries = f" (after {attempt} attempts)" if attempt > 1 else ""
            raise DownloadError(redact_text(
                f"data.source {url}: {describe_error(error)}{tries}; the freshness check "
                "could not ask the source whether it changed. Check the network or "
                "data.source", url)) from error
        delay = backoff_s * 2 ** (attempt - 1)
        print(redact_text(f"check: {url}: {describe_error(error)}; retrying in {delay:g}s",
                          url), file=sys.stderr)
        time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


def _hash_body(response: Any, limits: Limits, deadline: float) -> dict[str, Any]:
    sha256, size = hashlib.sha256(), 0
    for chunk in limits.chunks(response.read1, deadline):
        size += len(chunk)
        sha256.update(chunk)
    return {"bytes": size, "sha256": sha256.hexdigest()}
