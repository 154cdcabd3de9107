"""What the train stage leaves behind: models/model.safetensors with its card
(models/model.json) and reports/training.json, from the run's last checkpoint."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from dltrain.atomic import write_json
from dltrain.config import Params
from dltrain.errors import TrainingError
from dltrain.paths import Workspace
from dltrain.train.loopconfig import CHECKPOINT_HISTORY, CHECKPOINT_MODEL, best_epoch


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def read_final_checkpoint(directory: Path, hidden_sizes: tuple[int, ...]
                          ) -> tuple[list[dict[str, Any]], bytes]:
    """The epochs so far and the model.safetensors bytes (the best epoch's weights, serialised
    by rank 0) of the run's last checkpoint, checked to be float32 weights of the configured
    shapes."""
    from dltrain.model.architecture import expected_shapes
    from dltrain.model.weights import parse_state_dict

    model_file = directory / CHECKPOINT_MODEL
    if not model_file.is_file():
        raise TrainingError(f"the run's last checkpoint ({directory}) has no {CHECKPOINT_MODEL}: "
                            "it was written by an older dltrain; re-run with `--resume never`")
    weights = model_file.read_bytes()
    parse_state_dict(weights, model_file, expected_shapes(hidden_sizes),
                     f"model.hidden_sizes {list(hidden_sizes)}")
    return read_history(directory), weights


def read_history(directory: Path) -> list[dict[str, Any]]:
    """The epochs a checkpoint folder records, oldest first."""
    return json.loads((directory / CHECKPOINT_HISTORY).read_text())


def write_outputs(epochs: list[dict[str, Any]], weights: bytes, params: Params, ws: Workspace,
                  summary: dict[str, Any], *, mode: str, world_size: int, device: str,
                  nodes: list[str],
                  wall_s: float, name: str, storage: str, ray: dict[str, Any],
                  mlflow: dict[str, Any] | None = None,
                  trained_before: int | None = 0) -> dict[str, Any]:
    """models/model.safetensors (`weights`) with its card, and reports/training.json.

    `trained_before`: how many of `epochs` an earlier, interrupted process trained (a resumed
    run), whose times are not part of `wall_s`; None when that is not known here."""
    from dltrain.model.architecture import architecture
    from dltrain.model.weights import write_model_pair

    best_epoch_number = best_epoch(epochs)
    best = next(e for e in epochs if e["epoch"] == best_epoch_number)
    times = sorted(e["epoch_time_s"] for e in epochs)
    median = times[len(times) // 2]
    report = {
        "epochs": epochs,
        # "worker-group": Ray Train workers (train.num_workers >= 1); "local": Ray Train's local
        # mode, in the stage's own process (world_size 1, nodes ["local"]).
        "mode": mode,
        "world_size": world_size,
        "nodes": nodes,
        "device": device,
        "samples_per_s": epochs[-1]["samples"] / median if median else None,
        "wall_time_s": wall_s,
        # This process' wall time minus the epochs it trained; None for a resumed run whose
        # earlier epochs cannot be told apart.
        "ray_overhead_s": (None if trained_before is None else
                           wall_s - sum(e["epoch_time_s"] for e in epochs[trained_before:])),
        "resumed": any(e.get("attempt", 0) for e in epochs),
        # models/model.safetensors holds the weights of this epoch (best validation accuracy).
        "best_epoch": best_epoch_number,
        "run_name": name,
        "storage_path": storage,
        # Which Ray ran it: {"where": ..., "version": ..., "connect_s": ...}.
        "ray": ray,
        # Its MLflow run (dltrain.train.live): {"run_id", "training_id", "tracking_uri" (no
        # password), "unsent_epochs" (None when all were sent)}, which register completes; None
        # without live tracking.
        "mlflow": mlflow,
    }
    card = {
        "architecture": architecture(params.model.hidden_sizes),
        "params": params.to_dict(),
        "data": {"dataset": summary["dataset"], "data_checksum": summary.get("data_checksum"),
                 "test_sha256": summary.get("test", {}).get("sha256")},
        "git_commit": git_commit(ws.root),
        "mode": mode,
        "world_size": world_size,
        "device": device,
        "nodes": nodes,
        "timings": {"wall_time_s": wall_s, "epoch_times_s": [e["epoch_time_s"] for e in epochs]},
        "best_epoch": best_epoch_number,
        "final": {k: best[k] for k in ("train_loss", "train_accuracy", "val_loss",
                                        "val_accuracy")},
    }
    write_model_pair(weights, card, ws.model_path, ws.model_card_path)
    write_json(ws.training_report_path, report)
    return report
