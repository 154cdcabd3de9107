"""Test helpers: a processed data directory and a tiny model trained in-process with plain
PyTorch, laid out as the pipeline lays out its files (data/processed, models/, reports/)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml

from dltrain.atomic import read_json, write_json
from dltrain.config import Params
from dltrain.model.architecture import architecture
from dltrain.model.mlp import MLP, normalize
from dltrain.model.torchio import save_model
from dltrain.paths import Workspace

from conftest import synthetic_split

HIDDEN = (32,)


def split_sha256(path: Path, split: str) -> str:
    """A split's sha256 as preprocess records it: over its two .npy files' bytes, images first
    (evaluate checks the test split it reads against it)."""
    return hashlib.sha256((path / f"{split}_images.npy").read_bytes()
                          + (path / f"{split}_labels.npy").read_bytes()).hexdigest()


def write_processed_dir(path: Path, n_train: int = 600, n_val: int = 100, n_test: int = 200,
                        dataset: str = "fashion-mnist", seed: int = 0) -> Path:
    """The six .npy files and summary.json of data/processed, from synthetic data."""
    path.mkdir(parents=True, exist_ok=True)
    summary: dict = {"dataset": dataset, "val_fraction": 0.1, "seed": seed}
    for offset, (split, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        images, labels = synthetic_split(n, seed + offset)
        np.save(path / f"{split}_images.npy", images)
        np.save(path / f"{split}_labels.npy", labels)
        digest = split_sha256(path, split)
        summary[split] = {"n": n, "class_counts": np.bincount(labels, minlength=10).tolist(),
                          "sha256": digest}
    summary["data_checksum"] = hashlib.sha256(
        "".join(summary[s]["sha256"] for s in ("train", "val", "test")).encode()).hexdigest()
    write_json(path / "summary.json", summary)
    return path


def train_tiny(processed_dir: Path, epochs: int = 3, seed: int = 0,
               hidden: tuple[int, ...] = HIDDEN) -> tuple[MLP, list[dict]]:
    """A few epochs of RMSprop on the synthetic train split; returns the model and per-epoch
    records shaped like reports/training.json's."""
    torch.manual_seed(seed)
    x = normalize(torch.from_numpy(np.load(processed_dir / "train_images.npy")))
    y = torch.from_numpy(np.load(processed_dir / "train_labels.npy")).long()
    model = MLP(hidden)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    records = []
    for epoch in range(1, epochs + 1):
        for i in range(0, len(x), 32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = model(x)
            train_loss = torch.nn.functional.cross_entropy(logits, y).item()
            acc = (logits.argmax(1) == y).float().mean().item()
        records.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": acc,
                        "val_loss": train_loss, "val_accuracy": acc, "epoch_time_s": 0.1})
    model.eval()
    return model, records


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


def new_test_split(ws: Workspace, seed: int, n_test: int = 200) -> str:
    """Replace the processed test split with other images (as new data would), keeping train and
    val; returns the new test split's sha256."""
    images, labels = synthetic_split(n_test, seed)
    np.save(ws.processed_dir / "test_images.npy", images)
    np.save(ws.processed_dir / "test_labels.npy", labels)
    summary = read_json(ws.processed_dir / "summary.json")
    digest = split_sha256(ws.processed_dir, "test")
    summary["test"] = {"n": n_test, "class_counts": np.bincount(labels, minlength=10).tolist(),
                       "sha256": digest}
    summary["data_checksum"] = hashlib.sha256(
        "".join(summary[s]["sha256"] for s in ("train", "val", "test")).encode()).hexdigest()
    write_json(ws.processed_dir / "summary.json", summary)
    return digest


def plant_model(ws: Workspace, seed: int, epochs: int = 3) -> dict:
    """Train a new tiny model (epochs=0: its random initial weights) on the workspace's data,
    save it as the train stage would and evaluate it for real; returns the metrics."""
    from dltrain.evaluate.stage import evaluate

    model, records = train_tiny(ws.processed_dir, epochs=epochs, seed=seed)
    save_workspace_model(ws, model, records)
    return evaluate(ws.model_path, ws.processed_dir, ws.reports_dir, batch_size=256)
