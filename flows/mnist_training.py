"""The `mnist-training` Prefect flow: one task per stage of dvc.yaml, in its order. Each runs
`dvc repro --single-item <stage>`: DVC decides, from the cache and dvc.lock it shares with
`dvc repro`, whether a stage runs, is skipped or is restored from its run cache.

    python flows/mnist_training.py          # or: prefect deployment run 'mnist-training/local'
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed
from ruamel.yaml import YAML

from dltrain.config import apply_overrides, params_from_dict, read_params_file
from dltrain.errors import ConfigError, DltrainError
from dltrain.paths import FLOW_RUN_ID_ENV, Workspace
from flows.summary import publish_artifacts
from flows.workspace import params_overridden, workspace_lock

# The default workspace (a deployment's pull step makes its clone the working directory).
REPO_ROOT = Path(__file__).resolve().parent.parent

# The stages, in order, and which of them DVC runs every time (`always_changed`).
_DVC_YAML = YAML(typ="safe").load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
STAGES: list[str] = list(_DVC_YAML)
ALWAYS_RUNS = {name for name, stage in _DVC_YAML.items() if stage.get("always_changed")}
# Each task's timeout fits its stage's work. Only the stages that reach the data source retry (a
# mirror's hiccup): the others are deterministic, or retry on their own (Ray's FailureConfig).
TIMEOUT_S = {"download": 1800, "train": 4 * 3600, "evaluate": 1200}  # others: 600
RETRIES = {"check": 3, "download": 3}

# The flow's named parameters and the params.yaml key each one overrides.
PARAM_KEYS = {"dataset": "data.dataset", "epochs": "train.epochs", "use_gpu": "train.use_gpu",
              "num_workers": "train.num_workers", "ray_address": "train.ray_address"}

# DVC's advice after a stage: noise in a flow's log (filtered from the log, never parsed).
_HINTS = ("To track the changes with git", "git add ", "To enable auto staging",
          "dvc config core.autostage", "Use `dvc push`")
# The line `dltrain <stage>` prints for an error of its own: the cause, where DVC names the stage.
_CAUSE = re.compile(r"^dltrain [\w-]+: error: ")
GRACE_S = 15.0  # from a stopped stage's SIGINT to its SIGKILL


class StageFailedError(DltrainError):
    """`dvc status` or `dvc repro` of a stage exited non-zero."""


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run; a plain logger when a task's .fn is called alone."""
    with contextlib.suppress(MissingContextError):
        return get_run_logger()
    return logging.getLogger("dltrain.flows")


def stage_env() -> dict[str, str]:
    """The venv's bin first on PATH (dvc.yaml's commands call `dltrain`), unbuffered Python
    so that each line reaches the log when it is printed, and the flow run's id."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1",
            FLOW_RUN_ID_ENV: str(flow_run.id or "")}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the stage and every process under it (Ray's workers run in sessions of their own,
    out of reach of a group signal): SIGINT, as Ctrl-C (DVC releases its locks, `dltrain
    train` stops its Ray), then SIGKILL."""
    if proc.poll() is not None:  # exited and reaped: its pid may be another process's now
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
        for sig, wait_s in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 5.0)):
            for p in tree:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            _, tree = psutil.wait_procs(tree, timeout=wait_s)
            if not tree:
                break
    proc.wait()


def run_command(argv: list[str], workspace: Path, env: dict[str, str]) -> tuple[int, str]:
    """`argv` (dvc, dltrain) in `workspace`, its output (stderr merged) logged line by line.
    Returns its exit status and the cause: dltrain's own error line, else the last line. The
    command never outlives the task (done, timed out, cancelled, the flow run exiting), and it
    stays in the flow run's process group: a SIGKILL of that group reaches it too."""
    logger, last, cause = _logger(), "", None
    logger.info("$ %s  (in %s)", " ".join(argv), workspace)
    proc = subprocess.Popen(argv, cwd=workspace, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for raw in proc.stdout:  # type: ignore[union-attr]
            # A progress bar rewrites its line with carriage returns: keep its final state.
            line = raw.decode(errors="replace").rstrip().rsplit("\r", 1)[-1].rstrip()
            if line and not line.lstrip().startswith(_HINTS):
                last, cause = line, line if _CAUSE.match(line) else cause
                logger.info("%s", line)
        return proc.wait(), cause or last
    finally:
        _stop(proc)


def changed_stages(stages: list[str], workspace: Path) -> list[str]:
    """The stages among `stages` that `dvc repro --single-item` would run, per `dvc status`."""
    done = subprocess.run(["dvc", "status", "--json", *stages], cwd=workspace,
                          env=stage_env(), capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no error output"]
        raise StageFailedError(f"stage {', '.join(stages)!r} failed (dvc status exited "
                               f"{done.returncode}): {lines[-1]}")
    # Keys are stage names; a stage of another dvc.yaml would be `path/dvc.yaml:name`.
    reported = {str(key).rsplit(":", 1)[-1] for key in json.loads(done.stdout or "{}")}
    return [stage for stage in stages if stage in reported]


def run_stage(stage: str, workspace: Path) -> str:
    """`dvc repro --single-item <stage>` unless DVC finds the stage up to date. Returns
    "skipped", "ran", or "restored" (DVC checked its outputs out of its run cache). Raises
    StageFailedError naming the stage and the cause."""
    if stage not in ALWAYS_RUNS and not changed_stages([stage], workspace):
        outcome = "skipped"
    else:
        # The stage ran if DVC started its command: a `dltrain` first on PATH notes that,
        # then runs the real one. DVC restoring from its run cache starts no command.
        with tempfile.TemporaryDirectory(prefix=f"dltrain-{stage}-") as tmp:
            env = stage_env()
            if (real := shutil.which("dltrain", path=env["PATH"])) is None:
                raise StageFailedError("dltrain is not installed: run `make setup`")
            (note := Path(tmp) / "dltrain").write_text(
                f'#!/bin/sh\n: > {shlex.quote(tmp)}/ran\nexec {shlex.quote(real)} "$@"\n')
            note.chmod(0o755)
            env["PATH"] = f"{tmp}{os.pathsep}{env['PATH']}"
            code, cause = run_command(["dvc", "repro", "--single-item", stage], workspace, env)
            if code != 0:
                raise StageFailedError(f"stage {stage!r} failed (dvc repro exited {code}): "
                                       f"{cause or 'no error output'}")
            outcome = "ran" if (Path(tmp) / "ran").exists() else "restored"
    _logger().info("stage %s: %s", stage, outcome)
    return outcome


def _stage_task(stage: str):
    def run(workspace: str) -> str:
        return run_stage(stage, Path(workspace))

    run.__name__ = run.__qualname__ = f"{stage}_stage"  # Prefect's task key
    # NO_CACHE: DVC decides what to skip; a Prefect cache hit would skip a stage whose
    # outputs DVC knows to be stale.
    return task(run, name=stage, retries=RETRIES.get(stage, 0), retry_delay_seconds=[10, 60, 300],
                timeout_seconds=TIMEOUT_S.get(stage, 600), cache_policy=NO_CACHE)


TASKS = {stage: _stage_task(stage) for stage in STAGES}


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
    merged = {**(overrides or {}), **{PARAM_KEYS[k]: v for k, v in named.items() if v is not None}}
    # "env": the address in the flow run's environment (the scheduled deployment's worker runs
    # on the Ray head node, where RAY_ADDRESS is set).
    if merged.get("train.ray_address") == "env":
        if not os.environ.get("RAY_ADDRESS"):
            raise ConfigError("ray_address='env' but RAY_ADDRESS is not set in the flow run's "
                              "environment; start the worker with RAY_ADDRESS=<the head node's "
                              "address> (see infra/prefect/README.md)")
        merged["train.ray_address"] = os.environ["RAY_ADDRESS"]
    return merged


def run_pipeline(ws: Workspace, logger: logging.Logger | logging.LoggerAdapter) -> dict[str, str]:
    """The freshness check, then the others unless DVC finds them all up to date."""
    first, *rest = STAGES
    outcomes = {first: TASKS[first](str(ws.root))}
    if not changed_stages(rest, ws.root):
        logger.info("skipped: data unchanged, and DVC finds every stage up to date")
        return outcomes | {stage: "skipped" for stage in rest}
    return outcomes | {stage: TASKS[stage](str(ws.root)) for stage in rest}  # in order


def one_line(record: logging.LogRecord) -> bool:
    """No traceback for an error of dltrain's own (its one line says it all), nor a repeat."""
    if record.exc_info and isinstance(record.exc_info[1], DltrainError):
        record.exc_info, record.exc_text = None, None
        return record.name != "prefect.flow_runs"
    return True


@flow(name="mnist-training", log_prints=False)
def mnist_training(dataset: str | None = None, epochs: int | None = None,
                   num_workers: int | None = None, use_gpu: bool | None = None,
                   ray_address: str | None = None, overrides: dict[str, Any] | None = None,
                   workspace: str | None = None) -> dict[str, str]:
    """Run the stages of dvc.yaml through DVC. Parameters left None are as in params.yaml;
    `overrides` sets any other key for this run (`{"data.source": "file:///data/mnist"}`).
    Returns each stage's outcome: ran, skipped or restored (from DVC's run cache)."""
    named = {name: value for name, value in locals().items() if name in PARAM_KEYS}
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(one_line)  # once: addFilter skips a known one
    logger = get_run_logger()
    try:
        ws = resolve_workspace(workspace)
        changes = run_overrides(named, overrides)
        # Through the typed config: a bad value fails here, naming the key, before any stage.
        params = params_from_dict(apply_overrides(read_params_file(ws.params_path), changes))
        holder = f"flow run {flow_run.id or 'outside Prefect'} ({flow_run.name or '-'})"
        with workspace_lock(ws.root, holder), params_overridden(ws.params_path, changes, logger):
            if changes:
                logger.info("params for this run: %s", changes)
            outcomes = run_pipeline(ws, logger)
    except DltrainError as exc:
        # One line that names the cause: the state's message, and logged for `prefect
        # deployment run --watch`. Called directly, the flow still raises it.
        logger.error("%s", exc)
        return Failed(message=str(exc), data=exc)
    publish_artifacts(ws, outcomes, params.register.tracking_uri)
    return outcomes


if __name__ == "__main__":
    mnist_training()
