"""The MLflow run of a training run: the train stage opens it and logs params, lineage tags and
each epoch as it ends (dltrain.train.live, with the helpers here); register completes it with
test metrics, the params and epochs it lacks, the model and the evaluation reports, or creates
it when training could not reach the store.

The model goes in as an MLflow model (dltrain.registry.mlflow_model: a pyfunc "model from code" over
the safetensors weights and model.json, with the markdown model card): MLflow's own API loads
and serves it, and nothing in it is unpickled.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dltrain.config import Params
from dltrain.paths import Workspace
from dltrain.registry.mlflow_model import example_images, log_model
from dltrain.tracking.store import EXPERIMENT, embedded_artifact_uri, embedded_tracking_uri

if TYPE_CHECKING:
    from dltrain.registry.register import Candidate

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
An MLflow pyfunc model (model from code, safetensors weights: no pickle). Input: uint8 images
(N, 28, 28); output: class probabilities (N, 10). It needs mlflow, numpy and safetensors, not
torch or dltrain (its code travels with it).

```python
import mlflow

mlflow.set_tracking_uri("<this store's tracking URI>")
model = mlflow.pyfunc.load_model("models:/{name}@champion")
probabilities = model.predict(images)  # images: np.uint8 array (N, 28, 28)
```

Served over HTTP (JSON `{{"inputs": images.tolist()}}` to `/invocations`, answered with
`{{"predictions": probabilities}}`):

```bash
MLFLOW_TRACKING_URI=<tracking URI> mlflow models serve -m models:/{name}@champion \\
    --env-manager local -h 127.0.0.1 -p 5001
```

With dltrain installed, the quick local path: `dltrain predict --model models:/{name}@champion
image.png`.
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


# The tags that tie an MLflow run to its training run: the Ray Train run's name (which decides
# resume) and the id kept in that run's directory (dltrain.train.storage.training_id), which
# tells apart two trainings of the same name (a finished run trained again, another clone).
RUN_NAME_TAG = "dltrain.run_name"
TRAINING_ID_TAG = "dltrain.training_id"
TRAINING_STATE_TAG = "dltrain.training"  # running, complete, failed, interrupted
# Logged with every epoch's batch: its steps are the epochs the run holds already.
EPOCH_MARK = "val_accuracy"
# What the train stage logs as params; evaluate's and register's sections are register's to add.
TRAINING_SECTIONS = ("data", "model", "train")


def find_training_run(client: Any, experiment_id: str, training_id: str) -> Any | None:
    """The live (not deleted) run tagged with `training_id`, or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TRAINING_ID_TAG}` = '{training_id}'",
        max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def logged_epochs(client: Any, run_id: str) -> set[int]:
    return {int(m.step) for m in client.get_metric_history(run_id, EPOCH_MARK)}


def log_epochs(client: Any, run_id: str, epochs: list[dict[str, Any]],
               logged: set[int] | None = None) -> list[int]:
    """Log the epochs the run does not hold yet (step = epoch number), all in one batch, so an
    epoch is in the run whole or not at all; returns the epoch numbers logged."""
    from mlflow.entities import Metric

    done = logged_epochs(client, run_id) if logged is None else logged
    new = [ep for ep in epochs if int(ep["epoch"]) not in done]
    if not new:
        return []
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(ep[key]), now, int(ep["epoch"]))
                                      for ep in new for key in EPOCH_KEYS if key in ep])
    return [int(ep["epoch"]) for ep in new]


def missing_params(run: Any, flat: dict[str, str]) -> list[Any]:
    """The params the run does not have yet. A param the run has keeps its value: MLflow refuses
    a change, and the training run's values are the ones the model was trained with."""
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flat.items() if k not in run.data.params]


def training_run(client: Any, tracking_uri: str, ws: Workspace, cand: Candidate,
                 model_name: str) -> Any:
    """The MLflow run that the train stage opened for this model (reports/training.json's
    `mlflow`), found by id or by the training's tag; else a new one, as when training could not
    reach MLflow or the workspace predates live tracking."""
    from mlflow.exceptions import MlflowException

    experiment_id = _experiment_id(client, tracking_uri, ws.root)
    live = cand.training.get("mlflow") or {}
    training = live.get("training_id")
    run = None
    if live.get("run_id"):
        try:
            run = client.get_run(live["run_id"])
        except MlflowException as exc:  # another store, or the run was deleted for good
            if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                raise
    if run is not None and (run.info.lifecycle_stage == "deleted"
                            or run.data.tags.get(TRAINING_ID_TAG) != training):
        run = None
    if run is None and training:
        run = find_training_run(client, experiment_id, training)
    if run is not None:
        return run
    tags = cand.tags()
    if training:
        tags[TRAINING_ID_TAG] = training
    if cand.training.get("run_name"):
        tags[RUN_NAME_TAG] = cand.training["run_name"]
    return client.create_run(experiment_id, tags=tags, run_name=cand.training.get("run_name")
                             or f"{model_name}-{cand.weights_sha256[:8]}")


def log_run(client: Any, tracking_uri: str, ws: Workspace, params: Params, cand: Candidate,
            model_name: str) -> str:
    """Complete the training's MLflow run (training_run): the epochs it does not hold yet,
    test metrics, the params training did not log, lineage tags, weights, card, plots."""
    from mlflow.entities import Metric, RunTag

    run = training_run(client, tracking_uri, ws, cand, model_name)
    run_id = run.info.run_id
    # The epochs training could not send: MLflow was unreachable, or an older workspace.
    log_epochs(client, run_id, cand.training.get("epochs", []))
    now = int(time.time() * 1000)
    metrics = []
    if "samples_per_s" in cand.training:
        metrics.append(Metric("samples_per_s", float(cand.training["samples_per_s"]), now, 0))
    metrics += [Metric(f"test_{key}", float(cand.metrics[key]), now, 0)
                for key in ("accuracy", "loss", "macro_f1") if key in cand.metrics]
    # Safe keys (test_f1/class_0_tshirt_top): a class name's own "/" would split the UI's
    # metric groups. The display names are a tag, and in the model card.
    per_class = cand.metrics.get("per_class", [])
    metrics += [Metric(f"test_f1/{m['key']}", float(m["f1"]), now, 0) for m in per_class]
    # A re-run of register on the same run adds no second value of the same figure.
    client.log_batch(run_id, metrics=[m for m in metrics if run.data.metrics.get(m.key) != m.value],
                     params=missing_params(run, flatten(params.to_dict())),
                     tags=[*(RunTag(k, v) for k, v in cand.tags().items()),
                           RunTag("dltrain.nodes", json.dumps(cand.card.get("nodes"))),
                           RunTag("dltrain.class_names",
                                  json.dumps({m["key"]: m["class"] for m in per_class}))])
    # The model as an MLflow model of this run (once, on a re-run too): register points its
    # version at it.
    log_model(client, run_id, ws.model_path, ws.model_card_path,
              model_card_markdown(model_name, cand, run_id), cand.weights_sha256,
              example_images(ws.processed_dir))
    reports = ws.reports
    for path in (reports.metrics, reports.per_class, reports.training, reports.confusion_png,
                 reports.misclassified_png, reports.curves_png):
        if path.is_file():
            client.log_artifact(run_id, str(path), "reports")
    client.set_terminated(run_id)
    return run_id
