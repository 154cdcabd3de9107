"""The MLflow run of a training run, the part both of its writers share: the train stage opens it
and logs params, lineage tags and each epoch as it ends (dltrain.train.live); register completes
it (dltrain.registry.runlog). Here: the experiment, the tags that find the run, the epochs and
params it holds.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from dltrain.tracking.store import EXPERIMENT, embedded_artifact_uri, embedded_tracking_uri

# Each epoch's figures (their keys in training.json) and their metric names in MLflow. MLflow 3's
# run page groups the charts into sections by the name's part before its last "/", draws the
# named sections in alphabetical order and the unnamed one ("Model metrics") last: so the loss
# and accuracy curves ("train/...", "val/...") come first, and register's one-point figures
# (test_accuracy, test_loss, test_macro_f1, samples_per_s) after them. Within a section charts
# are alphabetical: the epoch's time is "time_s", after "accuracy" and "loss".
EPOCH_METRICS = {"train_loss": "train/loss", "train_accuracy": "train/accuracy",
                 "val_loss": "val/loss", "val_accuracy": "val/accuracy",
                 "epoch_time_s": "train/time_s"}
EPOCH_KEYS = tuple(EPOCH_METRICS)


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


def experiment_id(client: Any, tracking_uri: str, root: Path) -> str:
    """The id of dltrain's experiment in the store, created on first use."""
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
EXPERIMENT_TAG = "dltrain.experiment"  # the DVC experiment the run trained in (`dvc exp run`)
# Logged with every epoch's batch: its steps are the epochs the run holds already. Runs of an
# earlier dltrain named it as training.json does; a resumed one is read by both names.
EPOCH_MARK = EPOCH_METRICS["val_accuracy"]
EPOCH_MARKS = (EPOCH_MARK, "val_accuracy")
# What the train stage logs as params; evaluate's and register's sections are register's to add.
TRAINING_SECTIONS = ("data", "model", "train")


def display_name(run_key: str, dataset: str | None, started: datetime | None = None) -> str:
    """The run's name in the MLflow UI: data set, start time (local) and the short run key, e.g.
    `mnist-20261207-182201-4590e012`. Every training of the same params has the same run key,
    so the time is what tells two of them apart in the run list. Nothing finds a run by this
    name: the tags RUN_NAME_TAG (the whole key) and TRAINING_ID_TAG do."""
    when = (started or datetime.now()).strftime("%Y%m%d-%H%M%S")
    short = run_key.rsplit("-", 1)[-1][:8]  # dltrain-4590e012b1c8 -> 4590e012
    return "-".join(part for part in (dataset, when, short) if part)


def find_training_run(client: Any, experiment_id: str, training_id: str) -> Any | None:
    """The live (not deleted) run tagged with `training_id`, or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TRAINING_ID_TAG}` = '{training_id}'",
        max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def logged_epochs(client: Any, run_id: str) -> set[int]:
    return {int(m.step) for mark in EPOCH_MARKS for m in client.get_metric_history(run_id, mark)}


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
    client.log_batch(run_id, metrics=[Metric(name, float(ep[key]), now, int(ep["epoch"]))
                                      for ep in new for key, name in EPOCH_METRICS.items()
                                      if key in ep])
    return [int(ep["epoch"]) for ep in new]


def missing_params(run: Any, flat: dict[str, str]) -> list[Any]:
    """The params the run does not have yet. A param the run has keeps its value: MLflow refuses
    a change, and the training run's values are the ones the model was trained with."""
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flat.items() if k not in run.data.params]
