"""The MLflow run that each registration logs: params, per-epoch and test metrics, lineage tags,
the weights with their card, a markdown model card and the evaluation reports.

The model goes in as plain weights (model.pt, a tensor state dict, and model.json) plus a
markdown model card: no pickled MLflow flavour, so loading a registered model never runs code.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dltrain.config import Params
from dltrain.paths import Workspace
from dltrain.registry import (
    EXPERIMENT,
    MODEL_ARTIFACT_DIR,
    embedded_artifact_uri,
    embedded_tracking_uri,
)

if TYPE_CHECKING:
    from dltrain.register import Candidate

MODEL_CARD_FILE = "model_card.md"
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s")


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"epochs": 5}} -> {"train.epochs": "5"}; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def model_card_markdown(name: str, cand: Candidate, run_id: str) -> str:
    """The model card logged beside the weights: data, lineage, metrics, how to load it."""
    arch = cand.card.get("architecture", {})
    layers = "-".join(str(n) for n in [arch.get("input_size", 784), *arch.get(
        "hidden_sizes", []), arch.get("num_classes", 10)])
    data = cand.card.get("data", {})
    epochs = cand.training.get("epochs") or []
    last = epochs[-1] if epochs else {}
    rows = "\n".join(f"| {m['class']} | `{m['key']}` | {m['precision']:.4f} | "
                     f"{m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
                     for m in cand.metrics.get("per_class", []))
    params = json.dumps(cand.card.get("params", {}), indent=2, sort_keys=True)
    return f"""# {name}

A multi-layer perceptron ({layers}, ReLU, logits) classifying 28x28 grey images.

## Data
- data set: {data.get('dataset')}
- data checksum (processed train/val/test): `{data.get('data_checksum')}`
- test set sha256: `{cand.test_sha256}` ({cand.metrics.get('n')} images)

## Lineage
- git commit: `{cand.card.get('git_commit')}`
- Ray Train world size: {cand.card.get('world_size')}, device: {cand.card.get('device')},
  nodes: {cand.card.get('nodes')}
- weights sha256: `{cand.weights_sha256}`
- MLflow run: `{run_id}`

## Metrics
- test accuracy: {cand.accuracy:.4f}, test loss: {float(cand.metrics.get('loss', 'nan')):.4f}
- last epoch ({last.get('epoch')}): train accuracy {last.get('train_accuracy')},
  validation accuracy {last.get('val_accuracy')}

| class | MLflow key (`test_f1/...`) | precision | recall | F1 | support |
| --- | --- | --- | --- | --- | --- |
{rows}

## Parameters
```json
{params}
```

## How to load it
The weights are a plain tensor state dict (no pickle). With dltrain installed:

```bash
dltrain predict --model models:/{name}@champion image.png
```

```python
import mlflow
from dltrain.modelio import load_model

folder = mlflow.artifacts.download_artifacts("runs:/{run_id}/{MODEL_ARTIFACT_DIR}")
model, card = load_model(f"{{folder}}/model.pt")  # torch.load(weights_only=True), shapes checked
```
"""


def _experiment_id(client: Any, tracking_uri: str, root: Path) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    # The embedded store keeps artifacts beside the database, not in ./mlruns of the cwd.
    location = embedded_artifact_uri(root) if tracking_uri == embedded_tracking_uri(root) else None
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    # A registration running at the same time created it first.
    return client.get_experiment_by_name(EXPERIMENT).experiment_id


def log_run(client: Any, tracking_uri: str, ws: Workspace, params: Params, cand: Candidate,
            model_name: str) -> str:
    """One MLflow run: params, per-epoch and test metrics, lineage tags, weights, card, plots."""
    from mlflow.entities import Metric, Param, RunTag

    run = client.create_run(_experiment_id(client, tracking_uri, ws.root),
                            run_name=f"{model_name}-{cand.weights_sha256[:8]}",
                            tags=cand.tags())
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(ep[key]), now, int(ep["epoch"]))
               for ep in cand.training.get("epochs", []) for key in EPOCH_KEYS if key in ep]
    if "samples_per_s" in cand.training:
        metrics.append(Metric("samples_per_s", float(cand.training["samples_per_s"]), now, 0))
    metrics += [Metric(f"test_{key}", float(cand.metrics[key]), now, 0)
                for key in ("accuracy", "loss", "macro_f1") if key in cand.metrics]
    # Safe keys (test_f1/class_0_tshirt_top): a class name's own "/" would split the UI's
    # metric groups. The display names are a tag, and in the model card.
    per_class = cand.metrics.get("per_class", [])
    metrics += [Metric(f"test_f1/{m['key']}", float(m["f1"]), now, 0) for m in per_class]
    client.log_batch(run_id, metrics=metrics,
                     params=[Param(k, v) for k, v in flatten(params.to_dict()).items()],
                     tags=[RunTag("dltrain.nodes", json.dumps(cand.card.get("nodes"))),
                           RunTag("dltrain.class_names",
                                  json.dumps({m["key"]: m["class"] for m in per_class}))])
    for path in (ws.model_path, ws.model_card_path):
        client.log_artifact(run_id, str(path), MODEL_ARTIFACT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        card_md = Path(tmp) / MODEL_CARD_FILE
        card_md.write_text(model_card_markdown(model_name, cand, run_id))
        client.log_artifact(run_id, str(card_md), MODEL_ARTIFACT_DIR)
    for name in ("metrics.json", "per_class.json", "training.json", "confusion_matrix.png",
                 "misclassified.png", "training_curves.png"):
        if (ws.reports_dir / name).is_file():
            client.log_artifact(run_id, str(ws.reports_dir / name), "reports")
    client.set_terminated(run_id)
    return run_id
