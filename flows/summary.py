"""The run's artifacts in the Prefect UI: a summary built from the reports the stages wrote,
and links to the MLflow run and model version."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from dltrain.paths import Workspace

# A larger curves PNG is named by its path, not stored in every summary in Prefect's database.
CURVES_EMBED_MAX = 256 * 1024


def read_report(path: Path) -> dict[str, Any]:
    """A JSON report as a mapping; empty if it is missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    return {}


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value).replace("None", "—")


def headline(outcomes: dict[str, str]) -> str:
    """What the run did, then why: the first stage after the check that DVC did not skip."""
    first = next((stage for stage, done in list(outcomes.items())[1:] if done != "skipped"), "")
    if not first:
        return "**skipped: data unchanged**: DVC finds every stage up to date"
    why = {"download": "the data changed"}.get(first, f"{first}'s code or params changed")
    return f"**{'retrained' if outcomes.get('train') == 'ran' else 'ran'}: {why}**"


def data_lines(ws: Workspace) -> list[str]:
    summary = read_report(ws.summary_path)
    source = read_report(ws.raw_manifest_path).get("source")
    lines = [f"- data set: **{summary['dataset']}**, checksum `{summary.get('data_checksum')}`,"
             f" source `{source}`"] if summary.get("dataset") else []
    return lines + [f"- {split}: {summary[split]['n']} samples" for split in ("train", "val",
                    "test") if isinstance(summary.get(split), dict) and "n" in summary[split]]


def epoch_lines(ws: Workspace) -> list[str]:
    epochs = read_report(ws.training_report_path).get("epochs") or []
    lines = ["| epoch | train loss | train acc | val loss | val acc | time (s) |",
             "| --- | --- | --- | --- | --- | --- |"] if epochs else []
    lines += [f"| {e.get('epoch')} | {_fmt(e.get('train_loss'))} | {_fmt(e.get('train_accuracy'))}"
              f" | {_fmt(e.get('val_loss'))} | {_fmt(e.get('val_accuracy'))} | "
              f"{_fmt(e.get('epoch_time_s'), 2)} |" for e in epochs]
    # Embedded as a data URI: the Prefect UI shows it with no file server (offline clusters).
    path = ws.reports.curves_png
    data = path.read_bytes() if path.is_file() else b""
    if data.startswith(b"\x89PNG") and len(data) <= CURVES_EMBED_MAX:
        return [*lines, "", "![training curves: loss and accuracy per epoch](data:image/png;"
                f"base64,{base64.b64encode(data).decode('ascii')})"]
    return lines + (["", f"Training curves: `{path.relative_to(ws.root)}`"] if data else [])


def registry_lines(ws: Workspace, this_run: bool) -> list[str]:
    reg = read_report(ws.registration_path)
    lines = [] if this_run else ["- nothing registered in this run; the last registration:"]
    if not reg:
        return lines
    what = ("registered a new version" if reg.get("new_version") else
            "already registered, nothing new" if reg.get("registered") else "not registered")
    lines.append(f"- {what}: **{reg.get('model_name')}** version **{_fmt(reg.get('version'))}**"
                 f", aliases: {', '.join(reg.get('aliases') or []) or 'none'}")
    lines += [f"- {reg['reason']}"] if reg.get("reason") else []
    pages = zip(("the training run", "the model version"), mlflow_links(reg), strict=False)
    return lines + [f"- [{text}]({url})" for text, url in pages if url]


def run_summary(ws: Workspace, outcomes: dict[str, str]) -> str:
    """The markdown summary of one flow run; a report not written yet leaves its part empty."""
    metrics = read_report(ws.metrics_path)
    sections = {
        "Stages": ["| stage | outcome |", "| --- | --- |",
                   *(f"| {stage} | {outcome} |" for stage, outcome in outcomes.items())],
        "Data": data_lines(ws), "Training": epoch_lines(ws),
        "Test metrics": [f"- {key}: {_fmt(value)}" for key, value in sorted(metrics.items())
                         if isinstance(value, (int, float))],
        # "restored" (from DVC's run cache) registered nothing either.
        "Registry": registry_lines(ws, outcomes.get("register", "ran") == "ran")}
    parts = ["# mnist-training", "", headline(outcomes) if outcomes else ""]
    for title, lines in sections.items():
        parts += ["", f"## {title}", "", *lines]
    return "\n".join(parts) + "\n"


def mlflow_links(registration: dict[str, Any] | None,
                 tracking_uri: str | None = None) -> tuple[str | None, str | None]:
    """The MLflow UI pages of the run and the model version that reports/registration.json
    names, on the store it names (else `tracking_uri`). A tracking server serves its own UI:
    its URL without credentials, query or fragment (a link must never carry a password). An
    embedded store (sqlite:) has none: the link is where `make mlflow-ui` serves it."""
    reg = registration or {}
    uri = urlsplit(str(reg.get("tracking_uri") or tracking_uri or ""))
    if uri.scheme in ("http", "https") and uri.hostname:
        host = uri.hostname if ":" not in uri.hostname else f"[{uri.hostname}]"
        ui = urlunsplit((uri.scheme, host + (f":{uri.port}" if uri.port else ""),
                         uri.path.rstrip("/"), "", ""))
    elif uri.scheme or uri.path:
        ui = f"http://127.0.0.1:{os.environ.get('MLFLOW_PORT') or 5000}"
    else:
        return None, None
    run_id, name, version = reg.get("run_id"), reg.get("model_name"), reg.get("version")
    # `#/runs/<id>`: the UI's direct route to a run, which finds its experiment itself.
    return (f"{ui}/#/runs/{quote(str(run_id), safe='')}" if run_id else None,
            f"{ui}/#/models/{quote(str(name), safe='')}/versions/{quote(str(version))}"
            if version is not None and name else None)


def publish_artifacts(ws: Workspace, outcomes: dict[str, str], tracking_uri: str | None) -> None:
    """The run's summary, and links to its MLflow run and registered version."""
    create_markdown_artifact(run_summary(ws, outcomes), key="mnist-training-summary")
    reg = read_report(ws.registration_path)
    run, version = mlflow_links(reg, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if version:
        create_link_artifact(version, link_text=f"{reg.get('model_name')} version "
                             f"{reg.get('version')}", key="mnist-model")
    if run:
        create_link_artifact(run, link_text=f"MLflow run {reg.get('run_id')}",
                             key="mnist-mlflow-run")


def _trial_row(trial: dict[str, Any], keys: list[str], metric: str, best: Any) -> str:
    mark = " **(best)**" if trial.get("trial_id") == best else ""
    config = trial.get("config") or {}
    cells = [f"`{trial.get('trial_id')}`{mark}", str(trial.get("status")),
             str(trial.get("epochs")), _fmt(trial.get(metric)),
             *(f"`{json.dumps(config[k])}`" if k in config else "—" for k in keys)]
    return "| " + " | ".join(cells) + " |"


def tune_summary(report: dict[str, Any], applied: bool) -> str:
    """The markdown summary of a sweep (reports/tune.json): its figures, every trial, best
    first, and the winner, applied or with the command that applies it."""
    sweep, best = report.get("sweep") or {}, report.get("best") or {}
    metric, mode = sweep.get("metric", "val_accuracy"), sweep.get("mode", "max")
    trials = [t for t in report.get("trials") or [] if isinstance(t, dict)]
    ranked = sorted(trials, key=lambda t: (t.get(metric) is None,
                                           -(t.get(metric) or 0) if mode == "max"
                                           else t.get(metric) or 0))
    keys = sorted({k for t in trials for k in (t.get("config") or {})})
    lines = ["# mnist-tuning", "",
             f"- sweep `{sweep.get('name')}`: {len(trials)} trials, {sweep.get('scheduler')} "
             f"scheduler, {sweep.get('search')} search, {metric} ({mode}), "
             f"{_fmt(sweep.get('wall_s'), 1)} s",
             f"- trial-epochs run: {sweep.get('trial_epochs_run')} of a budget of "
             f"{sweep.get('trial_epochs_budget')} (the scheduler stops poor trials early)",
             f"- MLflow parent run: `{sweep.get('mlflow_run_id')}`", "", "## Trials", "",
             "| trial | status | epochs | " + " | ".join([metric, *keys]) + " |",
             "| --- " * (4 + len(keys)) + "|",
             *(_trial_row(t, keys, metric, best.get("trial_id")) for t in ranked),
             "", "## Winner", ""]
    if not best:
        return "\n".join([*lines, "no trial reported the metric: nothing to apply"]) + "\n"
    lines += [f"- trial `{best.get('trial_id')}`: {metric} {_fmt(best.get(metric))} after "
              f"{best.get('epochs')} epochs",
              *(f"- `{k}`: `{json.dumps(v)}`" for k, v in (best.get("config") or {}).items()),
              "", "applied to params.yaml, then the mnist-training pipeline ran" if applied
              else "not applied: run with `apply: true`, or `dltrain tune --apply-only` then "
                   "`dvc repro` in the workspace"]
    return "\n".join(lines) + "\n"
