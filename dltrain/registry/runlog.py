"""Register's half of a training's MLflow run: find the run the train stage opened (or create
it when training could not reach the store), complete it with test metrics, the params and
epochs it lacks, the model and the evaluation reports.

The model goes in as an MLflow model (dltrain.registry.mlflow_model: a pyfunc "model from code"
over the safetensors weights and model.json, with the markdown model card): MLflow's own API
loads and serves it, and nothing in it is unpickled.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dltrain.config import Params
from dltrain.paths import Workspace
from dltrain.registry.candidate import Candidate
from dltrain.registry.mlflow_model import example_images, log_model
from dltrain.tracking.runs import (
    RUN_NAME_TAG,
    TRAINING_ID_TAG,
    display_name,
    experiment_id,
    find_training_run,
    flatten,
    log_epochs,
    missing_params,
)


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

| class | key | precision | recall | F1 | support |
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


def training_run(client: Any, tracking_uri: str, ws: Workspace, cand: Candidate,
                 model_name: str) -> Any:
    """The MLflow run that the train stage opened for this model (reports/training.json's
    `mlflow`), found by id or by the training's tag; else a new one, as when training could not
    reach MLflow or the workspace predates live tracking."""
    from mlflow.exceptions import MlflowException

    experiment = experiment_id(client, tracking_uri, ws.root)
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
        run = find_training_run(client, experiment, training)
    if run is not None:
        return run
    tags = cand.tags()
    if training:
        tags[TRAINING_ID_TAG] = training
    if cand.training.get("run_name"):
        tags[RUN_NAME_TAG] = cand.training["run_name"]
    key = cand.training.get("run_name") or f"{model_name}-{cand.weights_sha256[:8]}"
    return client.create_run(experiment, tags=tags,
                             run_name=display_name(key, cand.card.get("data", {}).get("dataset")))


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
    # Per-class figures are no metrics: ten one-point charts would come before the epoch curves
    # on the run page. They are the artifact reports/per_class.json and the model card's table.
    # A re-run of register on the same run adds no second value of the same figure.
    client.log_batch(run_id, metrics=[m for m in metrics if run.data.metrics.get(m.key) != m.value],
                     params=missing_params(run, flatten(params.to_dict())),
                     tags=[*(RunTag(k, v) for k, v in cand.tags().items()),
                           RunTag("dltrain.nodes", json.dumps(cand.card.get("nodes")))])
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
