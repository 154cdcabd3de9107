"""A sweep in MLflow: one parent run per sweep, a child run per trial.

The children come from Ray Tune's MLflowLoggerCallback (ray.air.integrations.mlflow), given the
parent's id as the tag mlflow.parentRunId: it opens a trial's run when the trial starts, logs
the trial's config as params and every reported epoch as metrics (step = epoch), and ends the
run FINISHED, or FAILED for a trial that raised. dltrain adds the tag dltrain.tune.status:
completed, stopped (the scheduler ended it early) or error; and at the end of a sweep, a trial
run left RUNNING by an interrupted attempt (a resumed trial gets a new run) becomes KILLED.

All in the store and experiment the training uses (dltrain.tracking): the MLflow UI's compare
and parallel-coordinates views show a sweep's trials side by side. Nothing here registers a
model.
"""

from __future__ import annotations

import time
from typing import Any

from dltrain.config import Params
from dltrain.paths import Workspace
from dltrain.tracking.runs import display_name, experiment_id, flatten
from dltrain.tracking.store import EXPERIMENT, connect, resolve_tracking_uri

PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a child under its parent
SWEEP_TAG = "dltrain.tune.sweep"  # on the parent and every child: the sweep's name
ROLE_TAG = "dltrain.tune.role"  # sweep | trial
STATUS_TAG = "dltrain.tune.status"  # a trial's: completed | stopped | error | interrupted
TRIAL_TAG = "trial_name"  # MLflowLoggerCallback's: the Tune trial's name, ending in its id


class SweepRun:
    """The sweep's parent run: opened (or found again, when the sweep resumes) and finished."""

    def __init__(self, params: Params, ws: Workspace, name: str) -> None:
        self.params, self.ws, self.name = params, ws, name
        self.tracking_uri = resolve_tracking_uri(params.register.tracking_uri, ws.root)
        self.client = connect(self.tracking_uri)
        self.experiment_id = experiment_id(self.client, self.tracking_uri, ws.root)
        self.experiment = EXPERIMENT
        self.run_id = ""

    def open(self, run_id: str | None) -> str:
        """The parent run `run_id` again (a resumed sweep's), else a new one; RUNNING."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return run_id
        t = self.params.tune
        run = self.client.create_run(
            self.experiment_id,
            run_name=display_name(self.name.replace("dltrain-", ""),
                                  f"tune-{self.params.data.dataset}"),
            tags={SWEEP_TAG: self.name, ROLE_TAG: "sweep"})
        self.run_id = run.info.run_id
        space = {f"tune.space.{k}": str(v) for k, v in t.space.items()}
        settings = t.model_dump(mode="json", exclude={"space", "applied"})
        self.client.log_batch(self.run_id, params=_params(
            {**flatten(self.params.to_dict()), **flatten({"tune": settings}), **space}))
        return self.run_id

    def logger(self) -> Any:
        """Ray Tune's MLflow callback, opening each trial's run as a child of this one."""
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        return MLflowLoggerCallback(
            tracking_uri=self.tracking_uri, experiment_name=EXPERIMENT,
            tags={PARENT_TAG: self.run_id, SWEEP_TAG: self.name, ROLE_TAG: "trial"})

    def finish(self, report: dict[str, Any], status: str = "FINISHED") -> None:
        """The trials' status tags, the best trial's figures on the parent, and its end."""
        runs = {}
        for trial in report["trials"]:
            run = trial_run(self.client, self.experiment_id, self.run_id, trial["trial_id"])
            if run is not None:
                self.client.set_tag(run.info.run_id, STATUS_TAG, trial["status"])
                runs[run.info.run_id] = run
            trial["mlflow_run_id"] = run.info.run_id if run is not None else None
        for run in children(self.client, self.experiment_id, self.run_id):
            if run.info.status == "RUNNING" and run.info.run_id not in runs:
                self.client.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
                self.client.set_terminated(run.info.run_id, "KILLED")
        best = report.get("best")
        if best:
            now = int(time.time() * 1000)
            self.client.log_metric(self.run_id, f"best_{report['sweep']['metric']}",
                                   float(best[report["sweep"]["metric"]]), now, 0)
            self.client.set_tag(self.run_id, "dltrain.tune.best_trial", best["trial_id"])
        self.client.set_terminated(self.run_id, status)


    def finish_interrupted(self) -> None:
        """The parent of a sweep Ctrl-C stopped: KILLED until a re-run resumes it."""
        self.client.set_terminated(self.run_id, "KILLED")


def find_sweep_run(client: Any, experiment_id: str, name: str) -> Any | None:
    """The parent run of the sweep `name` (the latest, if several), or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and "
                                       f"tags.`{ROLE_TAG}` = 'sweep'",
        max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _params(flat: dict[str, str]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, v[:6000]) for k, v in flat.items()]


def children(client: Any, experiment_id: str, parent_id: str) -> list[Any]:
    return client.search_runs([experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              max_results=10000)


def trial_run(client: Any, experiment_id: str, parent_id: str, trial_id: str) -> Any | None:
    """The latest child run of the trial `trial_id`, or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and "
                                       f"tags.`{TRIAL_TAG}` LIKE '%_{trial_id}'",
        max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None
