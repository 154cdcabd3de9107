"""The `mnist-training` Prefect flow: the freshness check and the five DVC stages, one task
each, in order.

Thin on purpose: each task runs `dvc repro --single-item <stage>`, so the stage logic lives in
dltrain/ and DVC decides, from one cache and one dvc.lock shared with `dvc repro`, whether a
stage runs or is skipped. Prefect adds retries, timeouts, parameters, schedules, logs and
artifacts.

Right after the check, one `dvc status` over the other stages tells whether anything is to be
done: with the data unchanged and every stage up to date, the run ends there ("skipped: data
unchanged"), in seconds, without starting Ray or any other stage.

    python flows/mnist_training.py                      # one run, no server needed
    prefect deployment run 'mnist-training/local' -p epochs=1
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.tasks import exponential_backoff

from dltrain.errors import ConfigError, DltrainError
from dltrain.paths import Workspace
from flows.dvc_stage import StageResult, changed_stages, run_stage
from flows.report import (
    SKIPPED_UNCHANGED,
    Verdict,
    freshness_verdict,
    mlflow_links,
    read_report,
    run_summary,
)
from flows.workspace import params_overridden, validate_overrides, workspace_lock

# The repo this file lives in: the default workspace, also for a deployment, whose pull step
# makes the clone it was deployed from the working directory.
REPO_ROOT = Path(__file__).resolve().parent.parent

# The flow's named parameters and the params.yaml key each one overrides.
PARAM_KEYS = {
    "dataset": "data.dataset",
    "epochs": "train.epochs",
    "num_workers": "train.num_workers",
    "use_gpu": "train.use_gpu",
    "ray_address": "train.ray_address",
}
# `ray_address="env"`: take the address from RAY_ADDRESS in the flow run's environment at run
# time (the scheduled deployment's worker runs on the Ray head node, where it is set).
RAY_ADDRESS_FROM_ENV = "env"


@dataclass(frozen=True)
class StageSpec:
    """How Prefect runs one stage: its timeout fits its work; only the stages that talk to the
    data source are worth retrying (a mirror's hiccup), the others are deterministic or retry
    on their own (Ray Train's FailureConfig). `always_runs`: DVC runs it every time
    (`always_changed`), so its status is not asked first."""

    name: str
    timeout_s: float
    retries: int = 0
    always_runs: bool = False


# The one list of stages, in order; it must match dvc.yaml (tests/test_flows.py checks).
STAGES: tuple[StageSpec, ...] = (
    StageSpec("check", timeout_s=10 * 60, retries=3, always_runs=True),
    StageSpec("download", timeout_s=30 * 60, retries=3),
    StageSpec("preprocess", timeout_s=10 * 60),
    StageSpec("train", timeout_s=4 * 60 * 60),
    StageSpec("evaluate", timeout_s=20 * 60),
    StageSpec("register", timeout_s=10 * 60),
)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run; a plain logger when a task's .fn is called alone."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dltrain.flows")


def _make_task(spec: StageSpec):
    def run(workspace: str) -> StageResult:
        return run_stage(spec.name, Path(workspace), _logger(), timeout_s=spec.timeout_s,
                         always_runs=spec.always_runs)

    run.__name__ = run.__qualname__ = f"{spec.name}_stage"
    run.__doc__ = f"`dvc repro --single-item {spec.name}` in `workspace`."
    # NO_CACHE: DVC decides what to skip; a Prefect cache hit would skip a stage whose
    # outputs DVC knows to be stale.
    return task(run, name=spec.name, retries=spec.retries,
                retry_delay_seconds=exponential_backoff(backoff_factor=10) if spec.retries else 0,
                retry_jitter_factor=0.5 if spec.retries else None,
                timeout_seconds=spec.timeout_s, cache_policy=NO_CACHE, log_prints=False)


TASKS = {spec.name: _make_task(spec) for spec in STAGES}
check, download, preprocess, train, evaluate, register = (TASKS[s.name] for s in STAGES)


def resolve_workspace(workspace: str | None) -> Workspace:
    """The flow parameter, else DLTRAIN_WORKSPACE, else the repo this file lives in."""
    root = Path(workspace or os.environ.get("DLTRAIN_WORKSPACE") or REPO_ROOT)
    if not (root / "dvc.yaml").is_file():
        raise ConfigError(f"workspace {root} has no dvc.yaml; pass workspace=<a dltrain clone> "
                          "or set DLTRAIN_WORKSPACE")
    return Workspace.at(root)


def run_overrides(named: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The params.yaml overrides of one run: `overrides` (section.key -> value), then the
    named parameters that are not None."""
    merged = dict(overrides or {})
    for name, value in named.items():
        if value is None:
            continue
        if name == "ray_address" and value == RAY_ADDRESS_FROM_ENV:
            value = os.environ.get("RAY_ADDRESS")
            if not value:
                raise ConfigError("ray_address='env' but RAY_ADDRESS is not set in the flow "
                                  "run's environment; start the worker with RAY_ADDRESS=<the "
                                  "head node's address> (see infra/prefect/README.md)")
        merged[PARAM_KEYS[name]] = value
    return merged


def run_pipeline(ws: Workspace, logger: logging.Logger | logging.LoggerAdapter
                 ) -> tuple[dict[str, StageResult], Verdict]:
    """The check, then the other stages unless the data are unchanged and DVC finds every
    one of them up to date. Returns each stage's outcome and what the check decided."""
    first, *rest = STAGES
    before = read_report(ws.source_fingerprint_path)
    outcomes = {first.name: TASKS[first.name](str(ws.root))}
    # One dvc process for all the stages: the verdict costs about a second.
    stale = changed_stages([s.name for s in rest], ws.root)
    verdict = freshness_verdict(before, read_report(ws.source_fingerprint_path), stale)
    if verdict.skipped:
        logger.info("%s: %s", SKIPPED_UNCHANGED, verdict.reason)
        outcomes.update({s.name: StageResult(s.name, "skipped", 0.0) for s in rest})
        return outcomes, verdict
    logger.info("%s: %s", "data changed" if verdict.data_changed else "data unchanged",
                verdict.reason)
    for spec in rest:
        outcomes[spec.name] = TASKS[spec.name](str(ws.root))
    return outcomes, verdict


def publish_artifacts(ws: Workspace, outcomes: dict[str, StageResult],
                      overrides: dict[str, Any], tracking_uri: str | None,
                      verdict: Verdict | None = None) -> None:
    """The run's summary, and links to the training run and the registered version in the
    MLflow UI, in the Prefect UI."""
    create_markdown_artifact(run_summary(ws, outcomes, overrides, verdict),
                             key="mnist-training-summary",
                             description="What the run did and why: data, training, test "
                                         "metrics and registry outcome")
    registration = read_report(ws.registration_path)
    links = mlflow_links(registration, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    if links is None:
        return
    where = (f"Served by `make mlflow-ui` (the embedded store) at {links.ui}" if links.embedded
             else f"The MLflow server at {links.ui}")
    name = registration.get("model_name")
    if links.version:
        create_link_artifact(links.version, link_text=f"{name} version "
                             f"{registration.get('version')}", key="mnist-model",
                             description=f"The registered model version. {where}")
    if links.run:
        create_link_artifact(links.run, link_text=f"MLflow run {registration.get('run_id')}",
                             key="mnist-mlflow-run",
                             description=f"The training run: params, per-epoch curves, test "
                                         f"metrics, the model. {where}")


class _OneLineErrors(logging.Filter):
    """Drops the traceback from a run's log record when the error is one dltrain raises on
    purpose (DltrainError: its message names the cause and the fix); Prefect logs every
    exception a task raises with its traceback. Any other error keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DltrainError):
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE_ERRORS = _OneLineErrors()


def expected_errors_in_one_line() -> None:
    """Install the filter on Prefect's flow- and task-run loggers (once per process)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if _ONE_LINE_ERRORS not in run_logger.filters:
            run_logger.addFilter(_ONE_LINE_ERRORS)


@flow(name="mnist-training", log_prints=False)
def mnist_training(dataset: str | None = None, epochs: int | None = None,
                   num_workers: int | None = None, use_gpu: bool | None = None,
                   ray_address: str | None = None, overrides: dict[str, Any] | None = None,
                   workspace: str | None = None) -> dict[str, str]:
    """Check the source, then download, preprocess, train, evaluate and register, each
    through DVC; with the data unchanged and every stage up to date, skip them all.

    Parameters left None are as in params.yaml. `overrides` sets any other key for this run
    (`{"data.source": "file:///data/mnist"}`); `ray_address="env"` reads RAY_ADDRESS at run
    time. Returns each stage's outcome: ran, skipped or restored (from DVC's run cache).
    """
    expected_errors_in_one_line()
    logger = get_run_logger()
    named = {"dataset": dataset, "epochs": epochs, "num_workers": num_workers,
             "use_gpu": use_gpu, "ray_address": ray_address}
    try:
        return run_flow(named, overrides, workspace, logger)
    except DltrainError as exc:
        # An error of ours is one line that names the cause: the run ends Failed with it as
        # the state's message (the UI's and `prefect flow-run inspect`'s), and logs it for
        # `prefect deployment run --watch`, which prints the run's logs. Called directly, the
        # flow still raises it (the state carries it).
        logger.error("%s", exc)
        return Failed(message=str(exc), data=exc)


def run_flow(named: dict[str, Any], overrides: dict[str, Any] | None, workspace: str | None,
             logger: logging.Logger | logging.LoggerAdapter) -> dict[str, str]:
    """The flow's body: validate, lock the workspace, run the stages, publish."""
    ws = resolve_workspace(workspace)
    changes = run_overrides(named, overrides)
    # Validated before any work: a bad value fails the run here, naming the key.
    params = validate_overrides(ws.params_path, changes)
    holder = f"flow run {flow_run.id or 'outside Prefect'} ({flow_run.name or '-'})"
    with workspace_lock(ws.root, holder), params_overridden(ws.params_path, changes, logger):
        if changes:
            logger.info("params for this run: %s", changes)
        outcomes, verdict = run_pipeline(ws, logger)
    publish_artifacts(ws, outcomes, changes, params.register.tracking_uri, verdict)
    return {name: result.outcome for name, result in outcomes.items()}


if __name__ == "__main__":
    mnist_training()
