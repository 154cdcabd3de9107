"""The run's summary for the Prefect UI, built from the reports the stages wrote.

A report that is missing (a stage not run yet, an older workspace) becomes a line saying so,
never an error: the summary describes what exists.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from dltrain.data.freshness import changed_files
from dltrain.paths import Workspace
from dltrain.tracking.store import embedded_tracking_uri

SKIPPED_UNCHANGED = "skipped: data unchanged"
# Where `make mlflow-ui` serves the embedded store unless MLFLOW_PORT says otherwise.
DEFAULT_MLFLOW_PORT = 5000

_MISSING = "_not available: {path} is missing_"


def read_report(path: Path) -> dict[str, Any] | None:
    """A JSON report as a mapping, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "—" if value is None else str(value)


def _rel(ws: Workspace, path: Path) -> str:
    return str(path.relative_to(ws.root))


def stages_section(outcomes: dict[str, Any]) -> list[str]:
    lines = ["## Stages", "", "| stage | outcome | time (s) |", "| --- | --- | --- |"]
    for name, result in outcomes.items():
        lines.append(f"| {name} | {result.outcome} | {result.duration_s:.1f} |")
    return lines


def data_section(ws: Workspace) -> list[str]:
    summary = read_report(ws.processed_dir / "summary.json")
    manifest = read_report(ws.raw_dir / "manifest.json")
    lines = ["## Data", ""]
    if summary is None:
        return lines + [_MISSING.format(path=_rel(ws, ws.processed_dir / "summary.json"))]
    lines.append(f"- data set: **{summary.get('dataset', '—')}**")
    checksum = summary.get("data_checksum")
    if checksum:
        lines.append(f"- data checksum: `{checksum}`")
    if manifest and manifest.get("source"):
        lines.append(f"- source: `{manifest['source']}`")
    for split in ("train", "val", "test"):
        info = summary.get(split)
        if isinstance(info, dict) and "n" in info:
            lines.append(f"- {split}: {info['n']} samples")
    return lines


def training_section(ws: Workspace) -> list[str]:
    report = read_report(ws.training_report_path)
    lines = ["## Training", ""]
    if report is None:
        return lines + [_MISSING.format(path=_rel(ws, ws.training_report_path))]
    lines += [f"- world size: {_fmt(report.get('world_size'))}, "
              f"samples/s (median epoch): {_fmt(report.get('samples_per_s'), 1)}", "",
              "| epoch | train loss | train acc | val loss | val acc | time (s) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for e in report.get("epochs", []):
        lines.append(
            f"| {e.get('epoch')} | {_fmt(e.get('train_loss'))} | "
            f"{_fmt(e.get('train_accuracy'))} | {_fmt(e.get('val_loss'))} | "
            f"{_fmt(e.get('val_accuracy'))} | {_fmt(e.get('epoch_time_s'), 2)} |")
    return lines + curves_lines(ws)


# The curves PNG is about 60 KB; a larger file (a changed plot) is linked by path instead of
# growing every summary artifact in Prefect's database.
CURVES_EMBED_MAX = 256 * 1024


def curves_lines(ws: Workspace) -> list[str]:
    """The evaluate stage's loss and accuracy curves, embedded in the summary as a data URI:
    the Prefect UI then shows them with no file server and no CDN (offline clusters)."""
    path = ws.reports.curves_png
    try:
        data = path.read_bytes()
    except OSError:
        return []
    if not data.startswith(b"\x89PNG") or len(data) > CURVES_EMBED_MAX:
        return ["", f"Training curves: `{_rel(ws, path)}`"]
    encoded = base64.b64encode(data).decode("ascii")
    return ["", f"![training curves: loss and accuracy per epoch](data:image/png;base64,{encoded})"]


def metrics_section(ws: Workspace) -> list[str]:
    metrics = read_report(ws.metrics_path)
    lines = ["## Test metrics", ""]
    if metrics is None:
        return lines + [_MISSING.format(path=_rel(ws, ws.metrics_path))]
    return lines + [f"- {key}: {_fmt(value)}" for key, value in sorted(metrics.items())
                    if isinstance(value, (int, float))]


@dataclass(frozen=True)
class Verdict:
    """What the freshness check and DVC found before the stages after the check ran."""

    stale: tuple[str, ...]  # the stages DVC found out of date right after the check
    data_changed: bool  # the download was among them
    reason: str  # one sentence: why the run skips, or what changed

    @property
    def skipped(self) -> bool:
        return not self.stale


def _where(fingerprint: dict[str, Any]) -> str:
    if fingerprint.get("source") is None:
        return f"{fingerprint.get('dataset')} from its known mirrors (published checksums)"
    return f"`{fingerprint['source']}`"


def freshness_verdict(before: dict[str, Any] | None, after: dict[str, Any] | None,
                      stale: list[str]) -> Verdict:
    """Why a run skips or goes on: `before` and `after` are data/source.json around the check,
    `stale` the stages DVC reports out of date after it."""
    after = after or {}
    short = str(after.get("id", ""))[:12]
    data_changed = "download" in stale
    if not stale:
        reason = (f"the freshness check found {_where(after)} unchanged since the last run "
                  f"(fingerprint `{short}`), and DVC finds every stage up to date (code, params "
                  "and outputs as dvc.lock records them): nothing was trained, evaluated or "
                  "registered")
    elif not data_changed:
        reason = (f"the data are unchanged ({_where(after)}, fingerprint `{short}`), but DVC "
                  f"found these stages out of date (their code or params changed): "
                  f"{', '.join(stale)}")
    elif before is None or (before.get("dataset"), before.get("source")) != (
            after.get("dataset"), after.get("source")):
        reason = (f"no earlier fingerprint of {_where(after)} (a first run, or another data "
                  f"set or source): the data were fetched from it (fingerprint `{short}`)")
    elif files := changed_files(before, after):
        reason = (f"the freshness check found new data at {_where(after)}: "
                  f"{', '.join(files)} changed (fingerprint `{str(before.get('id'))[:12]}` -> "
                  f"`{short}`); only those were fetched, and the stages after the download "
                  "ran on the new data")
    else:
        reason = (f"the source is unchanged ({_where(after)}, fingerprint `{short}`), but DVC "
                  "found the download out of date (data/raw missing or modified, or the "
                  "download's code or params changed)")
    return Verdict(stale=tuple(stale), data_changed=data_changed, reason=reason)


def headline(verdict: Verdict, outcomes: dict[str, Any]) -> str:
    """One line: which happened (skipped, retrained, ran) and why."""
    if verdict.skipped:
        return f"**{SKIPPED_UNCHANGED}**: {verdict.reason}."
    trained = getattr(outcomes.get("train"), "outcome", None) == "ran"
    what = "retrained" if trained else "ran"
    data = "data changed" if verdict.data_changed else "data unchanged"
    return f"**{what}: {data}**: {verdict.reason}."


def registry_section(ws: Workspace, this_run: bool = True) -> list[str]:
    reg = read_report(ws.registration_path)
    lines = ["## Registry", ""]
    if not this_run:
        lines.append("- nothing registered in this run")
        if reg is None:
            return lines
        lines.append("- the last registration, by an earlier run:")
    if reg is None:
        return lines + [_MISSING.format(path=_rel(ws, ws.registration_path))]
    aliases = ", ".join(reg.get("aliases") or []) or "none"
    if reg.get("new_version"):
        verdict = "registered a new version"
    elif reg.get("registered"):
        verdict = "already registered, nothing new"
    else:
        verdict = "not registered"
    lines.append(f"- {verdict}: **{reg.get('model_name', '—')}** version "
                 f"**{_fmt(reg.get('version'))}**, aliases: {aliases}")
    if reg.get("reason"):
        lines.append(f"- {reg['reason']}")
    return lines + mlflow_section(ws, reg)


def mlflow_section(ws: Workspace, reg: dict[str, Any]) -> list[str]:
    """Links to the run (its curves) and the model version in the MLflow UI, and for the
    embedded store the command that serves the UI at that address."""
    links = mlflow_links(reg)
    if links is None:
        return []
    pages = [f"[the training run]({links.run})" if links.run else None,
             f"[the model version]({links.version})" if links.version else None]
    lines = ["- in MLflow: " + ", ".join(p for p in pages if p)]
    if links.embedded:
        uri = str(reg.get("tracking_uri"))
        port = links.ui.rsplit(":", 1)[-1]
        serve = ("`make mlflow-ui`" + (f" (MLFLOW_PORT={port})" if port != str(
                    DEFAULT_MLFLOW_PORT) else "")
                 if uri == embedded_tracking_uri(ws.root)
                 else f"`mlflow ui --backend-store-uri {uri} --port {port}`")
        lines.append(f"- the store is embedded ({uri}): {serve} in the workspace serves "
                     f"the UI at {links.ui}")
    return lines


def run_summary(ws: Workspace, outcomes: dict[str, Any], run_params: dict[str, Any],
                verdict: Verdict | None = None) -> str:
    """The markdown summary of one flow run; with `verdict`, it opens with what the run did
    (skipped, retrained, ran) and why."""
    params = ", ".join(f"`{k}={v}`" for k, v in sorted(run_params.items())) or "as in params.yaml"
    head = ["# mnist-training", ""]
    if verdict is not None:
        head += [headline(verdict, outcomes), ""]
        if verdict.skipped:
            head += ["The sections below describe the workspace's outputs, made by an earlier "
                     "run.", ""]
    # "restored" (from DVC's run cache) registered nothing either.
    registered = getattr(outcomes.get("register"), "outcome", "ran") == "ran"
    parts = [head + [f"Overrides for this run: {params}", ""],
             stages_section(outcomes), data_section(ws), training_section(ws),
             metrics_section(ws), registry_section(ws, this_run=registered)]
    return "\n".join("\n".join(p) + "\n" for p in parts)


def mlflow_ui(tracking_uri: str) -> tuple[str, bool]:
    """The MLflow UI address for a tracking store, and whether it is the embedded one. A
    tracking server serves its own UI: its URL without credentials, query or fragment (a link
    must never carry a password). An embedded store (sqlite:, a path) has no server: the link
    is where `make mlflow-ui` serves it, 127.0.0.1 on $MLFLOW_PORT (default 5000)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https") and parts.hostname:
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), False
    port = os.environ.get("MLFLOW_PORT") or DEFAULT_MLFLOW_PORT
    return f"http://127.0.0.1:{port}", True


@dataclass(frozen=True)
class MlflowLinks:
    """Where the MLflow UI shows a registration's training run and its model version."""

    ui: str
    embedded: bool  # no server of its own: `make mlflow-ui` (or `mlflow ui`) serves it
    run: str | None
    version: str | None


def mlflow_links(registration: dict[str, Any] | None,
                 tracking_uri: str | None = None) -> MlflowLinks | None:
    """The UI pages of the run and the model version that reports/registration.json names, on
    the store it names (else `tracking_uri`); None when it names neither."""
    if not registration:
        return None
    uri = registration.get("tracking_uri") or tracking_uri
    run_id, version = registration.get("run_id"), registration.get("version")
    name = registration.get("model_name")
    if not uri or not (run_id or (version is not None and name)):
        return None
    ui, embedded = mlflow_ui(str(uri))
    # `#/runs/<id>`: the UI's direct route to a run, which finds its experiment itself.
    run = f"{ui}/#/runs/{quote(str(run_id), safe='')}" if run_id else None
    page = (f"{ui}/#/models/{quote(str(name), safe='')}/versions/{quote(str(version))}"
            if version is not None and name else None)
    return MlflowLinks(ui=ui, embedded=embedded, run=run, version=page)


def model_link(registration: dict[str, Any] | None, tracking_uri: str | None) -> str | None:
    """The MLflow UI page of the registered version (see mlflow_links)."""
    links = mlflow_links(registration, tracking_uri)
    return links.version if links else None
