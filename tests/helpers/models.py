"""A tiny model trained in-process by the product's own loop (dltrain.train.loop.train_loop, the
per-worker loop the train stage runs under Ray) on synthetic data, laid out as the pipeline lays
out its files (data/processed, models/, reports/)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dltrain.atomic import read_json, write_json
from dltrain.config import Params
from dltrain.model.architecture import architecture
from dltrain.model.mlp import MLP
from dltrain.model.torchio import save_model
from dltrain.paths import Workspace
from dltrain.train.loop import train_loop
from dltrain.train.loopconfig import LoopConfig

from helpers.data import write_processed_dir

HIDDEN = (32,)


def train_tiny(processed_dir: Path, epochs: int = 3, seed: int = 0,
               hidden: tuple[int, ...] = HIDDEN) -> tuple[MLP, list[dict]]:
    """`epochs` epochs of the train stage's loop on one in-process worker (RMSprop, batch 32);
    returns the last epoch's model (epochs=0: the seeded initial weights) and the loop's
    per-epoch records, as reports/training.json lists them. The last epoch, not the stage's
    pick: on data this easy every epoch ties at full validation accuracy, and the stage ships
    the earliest of a tie, the least trained."""
    state = train_loop(LoopConfig(processed_dir=str(processed_dir), hidden_sizes=hidden,
                                  epochs=epochs, batch_size=32, learning_rate=1e-3,
                                  optimizer="rmsprop", seed=seed))
    model = MLP(hidden)
    model.load_state_dict(state.model)
    model.eval()
    return model, state.history


def save_workspace_model(ws: Workspace, model: MLP, records: list[dict],
                         params: Params | None = None) -> str:
    """models/model.safetensors + model.json and reports/training.json as the train stage
    writes them."""
    params = params or Params()
    summary = read_json(ws.processed_dir / "summary.json")
    card = {"architecture": architecture(model.hidden_sizes), "params": params.to_dict(),
            "data": {"dataset": summary["dataset"], "data_checksum": summary["data_checksum"],
                     "test_sha256": summary["test"]["sha256"]},
            "git_commit": "0123456789abcdef", "world_size": 2, "device": "cpu",
            "nodes": ["node-a"], "timings": {"fit_s": 1.0}}
    write_json(ws.training_report_path, {"epochs": records, "world_size": 2,
                                         "samples_per_s": 1000.0, "nodes": ["node-a"]})
    return save_model(model.state_dict(), card, ws.model_path)


def write_params(root: Path, params: Params | None = None) -> Path:
    """params.yaml in `root` (the defaults unless given), as the CLI reads it."""
    path = Path(root) / "params.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump((params or Params()).to_dict()))
    return path


def make_trained_workspace(root: Path, epochs: int = 3, seed: int = 0,
                           dataset: str = "fashion-mnist") -> Workspace:
    """A workspace with processed synthetic data, a trained tiny model and its training report."""
    ws = Workspace.at(root)
    write_params(ws.root)
    write_processed_dir(ws.processed_dir, dataset=dataset)
    model, records = train_tiny(ws.processed_dir, epochs=epochs, seed=seed)
    save_workspace_model(ws, model, records)
    return ws


def evaluated_workspace(root: Path, seed: int = 0) -> Workspace:
    """make_trained_workspace + the evaluate stage's reports."""
    from dltrain.evaluate.stage import evaluate

    ws = make_trained_workspace(root, seed=seed)
    evaluate(ws.model_path, ws.processed_dir, ws.reports_dir, batch_size=256)
    return ws


def replace_weights(ws: Workspace, seed: int, accuracy: float | None = None) -> str:
    """New weights (the old ones plus a little noise) and reports/metrics.json and
    per_class.json as if evaluate had measured them (their sha256), with `accuracy` written in
    when given. Returns the new weights' sha256."""
    from dltrain.model.torchio import load_model

    model, card = load_model(ws.model_path)
    generator = torch.Generator().manual_seed(seed)
    state = {k: v + 1e-4 * torch.randn(v.shape, generator=generator)
             for k, v in model.state_dict().items()}
    sha = save_model(state, {k: v for k, v in card.items() if k != "weights_sha256"},
                     ws.model_path)
    metrics = read_json(ws.metrics_path)
    metrics["weights_sha256"] = sha
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    write_json(ws.metrics_path, metrics)
    per_class = ws.reports_dir / "per_class.json"
    write_json(per_class, {**read_json(per_class), "weights_sha256": sha})
    return sha


def plant_model(ws: Workspace, seed: int, epochs: int = 3) -> dict:
    """Train a new tiny model (epochs=0: its random initial weights) on the workspace's data,
    save it as the train stage would and evaluate it for real; returns the metrics."""
    from dltrain.evaluate.stage import evaluate

    model, records = train_tiny(ws.processed_dir, epochs=epochs, seed=seed)
    save_workspace_model(ws, model, records)
    return evaluate(ws.model_path, ws.processed_dir, ws.reports_dir, batch_size=256)
