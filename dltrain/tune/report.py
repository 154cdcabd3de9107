"""reports/tune.json and what the command prints: every trial's config, epochs, status and final
validation figures, and the best trial. Built from Ray Tune's ResultGrid; no Ray here."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dltrain.config import Params
from dltrain.tune.space import planned_epochs, trial_values

# A trial's directory in the sweep's (TuneConfig's trial_dirname_creator): trial_<trial id>.
TRIAL_DIR_PREFIX = "trial_"


def trial_dirname(trial: Any) -> str:
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}"


def _figure(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def trial_record(result: Any, params: Params) -> dict[str, Any]:
    """One trial of a ResultGrid as reports/tune.json holds it."""
    metrics = result.metrics or {}
    # Ray Tune's Result knows a trial's config from its reports: none for a trial that failed
    # before its first epoch.
    config = result.config or {}
    epochs = int(metrics.get("epoch") or 0)
    if result.error is not None:
        status = "error"
    else:
        status = "completed" if epochs >= planned_epochs(params, config) else "stopped"
    record = {"trial_id": Path(str(result.path)).name.removeprefix(TRIAL_DIR_PREFIX),
              "mlflow_run_id": None, "status": status, "epochs": epochs,
              "config": trial_values(config, params),
              "val_accuracy": _figure(metrics, "val_accuracy"),
              "val_loss": _figure(metrics, "val_loss")}
    if result.error is not None:
        lines = str(result.error).strip().splitlines()
        record["error"] = lines[-1][:500] if lines else type(result.error).__name__
    return record


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The trial with the best final `metric` among those that ran all their epochs (the
    configs that `--apply` then `dvc repro` train in full); the earliest of a tie."""
    done = [t for t in trials if t["status"] == "completed" and t[metric] is not None]
    if not done:
        return None
    sign = 1.0 if mode == "max" else -1.0
    best = max(enumerate(done), key=lambda it: (sign * it[1][metric], -it[0]))[1]
    return {"trial_id": best["trial_id"], "config": best["config"], metric: best[metric],
            **({"val_accuracy": best["val_accuracy"]} if metric != "val_accuracy" else {}),
            "epochs": best["epochs"]}


def build_report(params: Params, results: list[Any], sweep: dict[str, Any]) -> dict[str, Any]:
    """reports/tune.json's content (sweep: name, mlflow_run_id, experiment, storage, wall_s)."""
    t = params.tune
    trials = sorted((trial_record(r, params) for r in results), key=lambda r: r["trial_id"])
    return {"sweep": {**sweep, "metric": t.metric, "mode": t.objective_mode,
                      "num_samples": t.num_samples, "scheduler": t.scheduler,
                      "search": t.search,
                      "trial_epochs_run": sum(r["epochs"] for r in trials),
                      "trial_epochs_budget": sum(planned_epochs(params, r.config or {})
                                                 for r in results)},
            "trials": trials,
            "best": best_trial(trials, t.metric, t.objective_mode)}


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value).replace(" ", "")


def table_lines(report: dict[str, Any]) -> list[str]:
    """The trial table: one row per trial, the varying keys as columns, the best marked *."""
    trials = report["trials"]
    keys = [k for k in (trials[0]["config"] if trials else {})
            if len({str(t["config"].get(k)) for t in trials}) > 1] or \
        list(trials[0]["config"] if trials else {})
    best = (report.get("best") or {}).get("trial_id")
    header = ["", "trial", "status", "epochs", "val_acc", "val_loss", *keys]
    rows = [["*" if t["trial_id"] == best else "", t["trial_id"], t["status"], str(t["epochs"]),
             "-" if t["val_accuracy"] is None else f"{t['val_accuracy']:.4f}",
             "-" if t["val_loss"] is None else f"{t['val_loss']:.4f}",
             *(_value(t["config"].get(k)) for k in keys)] for t in trials]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *rows]]


def summary_lines(report: dict[str, Any], apply_command: str) -> list[str]:
    """The table, the winner and the one command that applies it."""
    s = report["sweep"]
    counts = {k: sum(t["status"] == k for t in report["trials"])
              for k in ("completed", "stopped", "error")}
    lines = [f"sweep {s['name']}: {len(report['trials'])} trials in {s['wall_s']:.0f}s "
             f"({counts['completed']} completed, {counts['stopped']} stopped early, "
             f"{counts['error']} failed); {s['trial_epochs_run']} of "
             f"{s['trial_epochs_budget']} trial-epochs trained", *table_lines(report)]
    best = report.get("best")
    if best is None:
        return [*lines, "no trial completed: nothing to apply"]
    values = ", ".join(f"{k}={_value(v)}" for k, v in best["config"].items())
    return [*lines,
            f"best: trial {best['trial_id']}, {s['metric']} {best[s['metric']]:.4f} "
            f"after {best['epochs']} epochs: {values}",
            f"apply it to params.yaml (then `dvc repro` trains, evaluates and registers it): "
            f"{apply_command}"]
