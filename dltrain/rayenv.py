"""What every Ray process of a training run is given: quiet settings and a setup hook.

A module of its own, without torch: Ray imports it in every process it starts for the run (the
Train controller, its helper actors, the workers) to run the setup hook, and none of those but
the workers needs torch (dltrain.train imports it: ~1.5 s per process). Nor does it import
ray at the top: its settings must be in the environment before ray is imported.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings

# Environment for every Ray process: no usage reporting, no metrics exporters, no print
# patching (it doubles every line a worker prints), no preemption watcher (a cloud-spot feature
# whose actor start warns on every run), quicker polling. Set before ray is imported.
RAY_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The controller polls its workers this often: the default 2 s adds up to 2 s at the
    # start and again at the end of every run; a poll is one cheap call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Starting the worker group (new processes importing torch) can take over a minute on a
    # busy small machine; the default 60 s would fail the run for it.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_DEDUP_LOGS": "1",
    "RAY_DISABLE_IMPORT_WARNING": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
# Ray Train runs the training function in a thread of the worker process. libgomp (torch's
# OpenMP) gives each calling thread its own team, and once the worker's main thread has run a
# parallel region with a team of its own, the training thread's team runs about 1.7x slower
# (reproduced outside Ray: 0.96 s -> 1.65 s per epoch). With OMP_NUM_THREADS=1 the main thread
# never builds a team; the training thread sets its own count (torch.set_num_threads).
WORKER_ONLY_ENV = {"OMP_NUM_THREADS": "1"}
# Loggers whose messages a user can do nothing about. On a busy cluster the Train controller's
# placement-group cleaner warns once a second that the state API answered slowly ("Failed to
# query Ray Train Controller actor state"), and the autoscaling client prints a traceback for a
# resource request that merely timed out; neither affects the run.
NOISY_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.CRITICAL,
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
        logging.CRITICAL,
    # After a worker dies, tearing down its process group fails by definition; the traceback
    # hides the one line that matters (the TrainingError naming the failure).
    "ray.train.v2._internal.callbacks.backend_setup": logging.CRITICAL,
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    "ray.util.state": logging.ERROR,
}

# Set in the Train workers' runtime env only (dltrain.train): they, and no other process of the
# run, import torch. A worker's first use of torch used to cost it ~1.5 s for `import torch` (in
# the backend's process-group set-up) and ~1.2 s more for torch._dynamo, which torch.optim
# imports the first time an optimizer is built; both ran one after the other on the path to the
# first epoch. The setup hook starts them in a thread as the worker process starts, so they run
# while Ray creates the actor and the controller sets up the group. Everything of dltrain that
# runs in a worker and touches torch first calls wait_for_preload(): torch is never imported by
# two threads of a worker at once.
PRELOAD_ENV = "DLTRAIN_PRELOAD_TORCH"
PRELOAD_MODULES = ("torch", "torch._dynamo", "torch.nn.parallel")
_preload: threading.Thread | None = None
# dltrain.train._prestart_worker runs a no-op task in the workers' runtime env, for the idle
# process Ray starts beside the one that runs it. The process that runs the task is never a
# worker: the preload first waits this long for a task, and a process that got one stops there.
_PRELOAD_DELAY_S = 0.3
_ran_task = threading.Event()


def mark_task_process() -> None:
    """The no-op task of dltrain.train._prestart_worker: this process will not be a worker."""
    _ran_task.set()


def _start_preload() -> None:
    global _preload

    def load() -> None:
        if _ran_task.wait(_PRELOAD_DELAY_S):
            return
        for module in PRELOAD_MODULES:
            try:
                importlib.import_module(module)
            except Exception:  # noqa: BLE001  (raised again where the module is used)
                return

    _preload = threading.Thread(target=load, name="dltrain-preload-torch", daemon=True)
    _preload.start()


def wait_for_preload() -> None:
    """Block until the worker's torch preload (if any) is done; call before touching torch."""
    if _preload is not None:
        _preload.join()


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_worker() -> None:
    """worker_process_setup_hook: runs in every Ray process of this job (and the driver)."""
    import ray

    if os.environ.get(PRELOAD_ENV) == "1":
        _start_preload()
    for name, level in NOISY_LOGGERS.items():
        # A filter, not only a level: Ray Train's dictConfig resets the levels of existing
        # `ray.train.*` loggers when the controller starts, but leaves their filters.
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addFilter(_AtLeast(level))
    # ray.train's worker context logs each report() at INFO under a logger named by its file
    # path, outside the `ray.train` hierarchy that LoggingConfig controls. The path, not the
    # module: importing ray.train takes ~0.7 s, in the driver before ray.init.
    context_file = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal",
                                "execution", "context.py")
    logging.getLogger(context_file).setLevel(logging.WARNING)
    # Helpers that Ray Train starts find "the" cluster through RAY_ADDRESS; without it they
    # fail when a second Ray runs on the same machine.
    if ray.is_initialized() and "RAY_ADDRESS" not in os.environ:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def runtime_env() -> dict:
    return {"worker_process_setup_hook": "dltrain.rayenv.quiet_worker",
            "env_vars": {**RAY_QUIET_ENV, **WORKER_ONLY_ENV}}
