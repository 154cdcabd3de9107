"""The register stage: log the run to MLflow and register the model, promoting it with aliases.

The model goes in as plain weights (model.pt, a tensor state dict, and model.json) plus a
markdown model card: no pickled MLflow flavour, so loading a registered model never runs code.

Promotion (aliases, not the deprecated stages):
- below register.min_accuracy: not registered (the run is still logged, for the record);
- the same weights already registered (weights_sha256 tag): no new version;
- else a new version; it becomes `champion` when there is no champion, when it beats the
  champion by >= register.min_improvement on the same test data (test_sha256 tag), or when the
  champion was evaluated on different test data: accuracies on different test sets do not
  compare, and the new model is the one evaluated on the data the pipeline now uses. Otherwise
  it becomes `challenger`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dltrain.config import Params
from dltrain.errors import DataError, RegistryError
from dltrain.io import read_json, write_json
from dltrain.paths import Workspace
from dltrain.registry import (
    EXPERIMENT,
    MODEL_ARTIFACT_DIR,
    connect,
    display_uri,
    embedded_artifact_uri,
    embedded_tracking_uri,
    redact,
    resolve_tracking_uri,
)
from dltrain.weights import load_weights_and_digest

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_CARD_FILE = "model_card.md"
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s")
# Every input of the decision, as version tags, so that a later run can compare against them.
LINEAGE_TAGS = ("dataset", "data_checksum", "test_sha256", "git_commit", "ray_world_size",
                "device", "weights_sha256", "test_accuracy")
# Accuracies are fractions of whole samples; a tolerance keeps `>=` exact in intent.
_EPS = 1e-12


@dataclass(frozen=True)
class Candidate:
    """What the stage knows about the model it is asked to register."""

    card: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    weights_sha256: str

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def test_sha256(self) -> str:
        return str(self.metrics.get("test_sha256") or self.card.get("data", {}).get("test_sha256"))

    def tags(self) -> dict[str, str]:
        data = self.card.get("data", {})
        values = {"dataset": data.get("dataset"), "data_checksum": data.get("data_checksum"),
                  "test_sha256": self.test_sha256, "git_commit": self.card.get("git_commit"),
                  "ray_world_size": self.card.get("world_size"),
                  "device": self.card.get("device"), "weights_sha256": self.weights_sha256,
                  "test_accuracy": repr(self.accuracy)}
        return {k: str(v) for k, v in values.items() if v is not None}


def decide_promotion(accuracy: float, test_sha256: str, champion: dict[str, str] | None,
                     min_improvement: float) -> tuple[bool, str]:
    """(promote to champion?, why). `champion` holds the current champion's version tags plus
    its `version`, or is None when there is none."""
    if champion is None:
        return True, "no champion yet: the first model that passes min_accuracy becomes champion"
    version = champion.get("version")
    if champion.get("test_sha256") != test_sha256:
        return True, (f"champion (version {version}) was evaluated on different test data "
                      f"(test_sha256 {str(champion.get('test_sha256'))[:12]} vs "
                      f"{test_sha256[:12]}); accuracies do not compare, so the model evaluated "
                      "on the current test data becomes champion")
    best = float(champion.get("test_accuracy", "nan"))
    if accuracy - best + _EPS >= min_improvement:
        return True, (f"test accuracy {accuracy:.4f} beats champion version {version} "
                      f"({best:.4f}) by >= min_improvement {min_improvement}")
    return False, (f"test accuracy {accuracy:.4f} does not beat champion version {version} "
                   f"({best:.4f}) by min_improvement {min_improvement}: challenger")


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


def read_candidate(ws: Workspace) -> Candidate:
    """The model (checked to be plain weights of the right shapes), its card and reports.

    The weights are read without torch (dltrain.weights): importing torch only to check them
    cost this stage 1.5-2 s of its start."""
    _weights, card, weights_sha256 = load_weights_and_digest(ws.model_path, ws.model_card_path)
    if not ws.metrics_path.is_file():
        raise DataError(f"{ws.metrics_path} not found (run `dltrain evaluate` first)")
    metrics = read_json(ws.metrics_path)
    if "accuracy" not in metrics:
        raise DataError(f"{ws.metrics_path} has no `accuracy` (re-run `dltrain evaluate`)")
    training = read_json(ws.training_report_path) if ws.training_report_path.is_file() else {}
    return Candidate(card, metrics, training, weights_sha256)


def model_card_markdown(name: str, cand: Candidate, run_id: str) -> str:
    """The model card logged beside the weights: data, lineage, metrics, how to load it."""
    arch = cand.card.get("architecture", {})
    layers = "-".join(str(n) for n in [arch.get("input_size", 784), *arch.get(
        "hidden_sizes", []), arch.get("num_classes", 10)])
    data = cand.card.get("data", {})
    epochs = cand.training.get("epochs") or []
    last = epochs[-1] if epochs else {}
    rows = "\n".join(f"| {cls} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
                     f"{m['support']} |" for cls, m in cand.metrics.get("per_class", {}).items())
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

| class | precision | recall | F1 | support |
| --- | --- | --- | --- | --- |
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
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    # The embedded store keeps artifacts beside the database, not in ./mlruns of the cwd.
    location = embedded_artifact_uri(root) if tracking_uri == embedded_tracking_uri(root) else None
    return client.create_experiment(EXPERIMENT, artifact_location=location)


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
    metrics += [Metric(f"test_f1/{cls}", float(m["f1"]), now, 0)
                for cls, m in cand.metrics.get("per_class", {}).items()]
    client.log_batch(run_id, metrics=metrics,
                     params=[Param(k, v) for k, v in flatten(params.to_dict()).items()],
                     tags=[RunTag("dltrain.nodes", json.dumps(cand.card.get("nodes")))])
    for path in (ws.model_path, ws.model_card_path):
        client.log_artifact(run_id, str(path), MODEL_ARTIFACT_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        card_md = Path(tmp) / MODEL_CARD_FILE
        card_md.write_text(model_card_markdown(model_name, cand, run_id))
        client.log_artifact(run_id, str(card_md), MODEL_ARTIFACT_DIR)
    for name in ("metrics.json", "training.json", "confusion_matrix.png", "misclassified.png"):
        if (ws.reports_dir / name).is_file():
            client.log_artifact(run_id, str(ws.reports_dir / name), "reports")
    client.set_terminated(run_id)
    return run_id


def _number(version: Any) -> int | None:
    """MLflow gives version numbers as int from SQLite and as str over REST: report ints."""
    return None if version is None else int(version)


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None  # no such model or alias yet


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="dltrain MLP on MNIST-style images (weights + model card)")


def _register(client: Any, tracking_uri: str, ws: Workspace, params: Params,
              cand: Candidate) -> dict[str, Any]:
    cfg = params.register
    name = cfg.model_name
    champion = _alias_version(client, name, CHAMPION)
    outcome: dict[str, Any] = {
        "model_name": name, "version": None, "aliases": [], "registered": False,
        "new_version": False, "run_id": None, "tracking_uri": display_uri(tracking_uri),
        "test_accuracy": cand.accuracy, "test_sha256": cand.test_sha256,
        "weights_sha256": cand.weights_sha256,
        "previous_champion_version": _number(champion.version) if champion else None,
        "champion_version": _number(champion.version) if champion else None,
    }
    same = client.search_model_versions(
        f"name = '{name}' and tags.weights_sha256 = '{cand.weights_sha256}'")
    if same:
        # search results carry no aliases: fetch the version itself for them.
        existing = client.get_model_version(name, min(same, key=lambda v: int(v.version)).version)
        return {**outcome, "version": _number(existing.version), "aliases": list(existing.aliases),
                "registered": True, "run_id": existing.run_id,
                "reason": f"the same weights (sha256 {cand.weights_sha256[:12]}) are already "
                          f"version {existing.version}: no new version"}

    run_id = log_run(client, tracking_uri, ws, params, cand, name)
    outcome["run_id"] = run_id
    if cand.accuracy + _EPS < cfg.min_accuracy:
        client.set_tag(run_id, "dltrain.registered", "false")
        return {**outcome, "reason": f"test accuracy {cand.accuracy:.4f} is below "
                                     f"register.min_accuracy {cfg.min_accuracy}: not registered"}

    _ensure_registered_model(client, name)
    version = client.create_model_version(
        name, f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}", run_id=run_id, tags=cand.tags(),
        description=f"test accuracy {cand.accuracy:.4f} on {cand.tags().get('dataset')}")
    champion_tags = {**champion.tags, "version": champion.version} if champion else None
    promote, reason = decide_promotion(cand.accuracy, cand.test_sha256, champion_tags,
                                       cfg.min_improvement)
    alias = CHAMPION if promote else CHALLENGER
    client.set_registered_model_alias(name, alias, version.version)
    client.set_tag(run_id, "dltrain.registered", "true")
    number = _number(version.version)
    return {**outcome, "version": number, "aliases": [alias], "registered": True,
            "new_version": True, "reason": reason,
            "champion_version": number if promote else outcome["champion_version"]}


def register(ws: Workspace, params: Params, *, attempts: int = 4,
             backoff_s: float = 1.0) -> dict[str, Any]:
    """Log the run, register the model and move the aliases; write reports/registration.json.

    An unreachable tracking server is retried `attempts` times with exponential backoff from
    `backoff_s`, then RegistryError; registration.json is then not written, so a later
    `dvc repro` runs this stage again.
    """
    cand = read_candidate(ws)
    tracking_uri = resolve_tracking_uri(params.register.tracking_uri, ws.root)
    client = connect(tracking_uri, attempts=attempts, backoff_s=backoff_s)
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    try:
        outcome = _register(client, tracking_uri, ws, params, cand)
    except (MlflowException, RequestException) as exc:
        raise RegistryError(f"MLflow at {display_uri(tracking_uri)} failed during registration: "
                            f"{redact(str(exc), tracking_uri)}. The model stays in models/; "
                            "re-run `dltrain register` "
                            "(or `dvc repro`) once the store is reachable.") from exc
    write_json(ws.registration_path, outcome)
    where = (f"version {outcome['version']} ({', '.join(outcome['aliases']) or 'no alias'})"
             if outcome["version"] else "not registered")
    print(f"register: {outcome['model_name']} {where}: {outcome['reason']}")
    return outcome
