"""The run's summary for the Prefect UI, built from the reports the stages wrote.

A report that is missing (a stage not run yet, an older workspace) becomes a line saying so,
never an error: the summary describes what exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dltrain.paths import Workspace

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
    return lines


def metrics_section(ws: Workspace) -> list[str]:
    metrics = read_report(ws.metrics_path)
    lines = ["## Test metrics", ""]
    if metrics is None:
        return lines + [_MISSING.format(path=_rel(ws, ws.metrics_path))]
    return lines + [f"- {key}: {_fmt(value)}" for key, value in sorted(metrics.items())
                    if isinstance(value, (int, float))]


def registry_section(ws: Workspace) -> list[str]:
    reg = read_report(ws.registration_path)
    lines = ["## Registry", ""]
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
    return lines


def run_summary(ws: Workspace, outcomes: dict[str, Any], run_params: dict[str, Any]) -> str:
    """The markdown summary of one flow run."""
    params = ", ".join(f"`{k}={v}`" for k, v in sorted(run_params.items())) or "as in params.yaml"
    parts = [["# mnist-training", "", f"Overrides for this run: {params}", ""],
             stages_section(outcomes), data_section(ws), training_section(ws),
             metrics_section(ws), registry_section(ws)]
    return "\n".join("\n".join(p) + "\n" for p in parts)


def model_link(registration: dict[str, Any] | None, tracking_uri: str | None) -> str | None:
    """The MLflow UI page of the registered version, if the registry is an MLflow server
    (an embedded SQLite registry has no web page to link to)."""
    if not registration or registration.get("version") is None:
        return None
    uri = registration.get("tracking_uri") or tracking_uri
    if not uri or not uri.startswith(("http://", "https://")):
        return None
    name = quote(str(registration.get("model_name", "")), safe="")
    return f"{uri.rstrip('/')}/#/models/{name}/versions/{registration['version']}"
