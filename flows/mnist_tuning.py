"""The `mnist-tuning` Prefect flow: the data stages (the sweep trains on data/processed), a
hyperparameter sweep (`dltrain tune`, on Ray Tune) on the Ray the worker uses and, with
`apply: true`, the winner written into params.yaml (`dltrain tune --apply-only`) and the
mnist-training pipeline, which trains, evaluates and registers it through the gate. Like
mnist-training, it reaches dltrain through its CLI, and a run's overrides are in params.yaml
while its commands run.

    prefect deployment run 'mnist-tuning/tuning' -p apply=true
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed

from dltrain.config import apply_overrides, params_from_dict, read_params_file
from dltrain.errors import DltrainError
from flows.mnist_training import (
    STAGES,
    TASKS,
    StageFailedError,
    mnist_training,
    one_line,
    resolve_workspace,
    run_command,
    run_overrides,
    stage_env,
)
from flows.summary import read_report, tune_summary
from flows.workspace import params_overridden, workspace_lock

TUNE_TIMEOUT_S = 6 * 3600
DATA_STAGES = STAGES[:STAGES.index("preprocess") + 1]


def dltrain(args: list[str], workspace: str) -> None:
    """`dltrain <args>` in the workspace, logged; StageFailedError naming its cause."""
    code, cause = run_command(["dltrain", *args], Path(workspace), stage_env())
    if code != 0:
        raise StageFailedError(f"`dltrain {' '.join(args)}` failed (exit {code}): "
                               f"{cause or 'no error output'}")


# NO_CACHE: each run sweeps (or resumes the sweep) and applies anew.
@task(name="tune", timeout_seconds=TUNE_TIMEOUT_S, cache_policy=NO_CACHE)
def tune(workspace: str) -> dict[str, Any]:
    """The sweep; returns reports/tune.json."""
    dltrain(["tune"], workspace)
    return read_report(resolve_workspace(workspace).reports.tune)


@task(name="tune-apply", timeout_seconds=600, cache_policy=NO_CACHE)
def tune_apply(workspace: str) -> None:
    """The sweep's best values into params.yaml (a round-trip edit, recorded in tune.applied)."""
    dltrain(["tune", "--apply-only"], workspace)


@flow(name="mnist-tuning", log_prints=False)
def mnist_tuning(apply: bool = False, num_samples: int | None = None,
                 ray_address: str | None = None, overrides: dict[str, Any] | None = None,
                 workspace: str | None = None) -> dict[str, Any]:
    """Sweep params.yaml's `tune.space`; with `apply`, apply the winner and run the pipeline.
    `ray_address` as in mnist-training (`env`: the worker's RAY_ADDRESS); `overrides` sets
    any params key for the sweep (`{"tune.max_concurrent_trials": 2}`). Returns the best
    trial and, when applied, each stage's outcome."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(one_line)  # once: addFilter skips a known one
    logger = get_run_logger()
    try:
        ws = resolve_workspace(workspace)
        changes = run_overrides({"ray_address": ray_address}, overrides)
        if num_samples is not None:
            changes["tune.num_samples"] = num_samples
        params_from_dict(apply_overrides(read_params_file(ws.params_path), changes))
        holder = f"flow run {flow_run.id or 'outside Prefect'} ({flow_run.name or '-'})"
        with workspace_lock(ws.root, holder):
            with params_overridden(ws.params_path, changes, logger):
                for stage in DATA_STAGES:
                    TASKS[stage](str(ws.root))
                report = tune(str(ws.root))
            if apply:  # once the overrides are put back: they are this run's, not the winner's
                tune_apply(str(ws.root))
        create_markdown_artifact(tune_summary(report, apply), key="mnist-tuning-summary")
        stages = None
        if apply:  # the pipeline takes the workspace lock itself; a failed one raises
            stages = mnist_training(ray_address=changes.get("train.ray_address"),
                                    workspace=str(ws.root), overrides=pipeline_overrides(changes))
    except DltrainError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc), data=exc)
    return {"best": report.get("best"), "applied": apply, "pipeline": stages}


def pipeline_overrides(changes: dict[str, Any]) -> dict[str, Any]:
    """The run's overrides that the pipeline takes too: not the sweep's, nor the Ray (a
    parameter of its own)."""
    return {k: v for k, v in changes.items() if not k.startswith(("tune.", "train.ray_address"))}


if __name__ == "__main__":
    mnist_tuning()
