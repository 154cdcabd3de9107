"""What every Ray process of a training run is given: quiet settings and a setup hook.

A module of its own, without torch: Ray imports it in every process it starts for the run (the
Train controller, its helper actors, the workers) to run the setup hook, and none of those but
the workers needs torch (dltrain.train imports it: ~1.5 s per process). Nor does it import
ray at the top: its settings must be in the environment before ray is imported.
"""

from __future__ import annotations

import logging
import os
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


class _AtLeast(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def quiet_worker() -> None:
    """worker_process_setup_hook: runs in every Ray process of this job (and the driver)."""
    import ray

    for name, level in NOISY_LOGGERS.items():
        # A filter, not only a level: Ray Train's dictConfig resets the levels of existing
        # `ray.train.*` loggers when the controller starts, but leaves their filters.
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addFilter(_AtLeast(level))
    # ray.train's worker context logs each report() at INFO under a logger named by its file
    # path, outside the `ray.train` hierarchy that LoggingConfig controls.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # Helpers that Ray Train starts find "the" cluster through RAY_ADDRESS; without it they
    # fail when a second Ray runs on the same machine.
    if ray.is_initialized() and "RAY_ADDRESS" not in os.environ:
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def runtime_env() -> dict:
    return {"worker_process_setup_hook": "dltrain.rayenv.quiet_worker",
            "env_vars": {**RAY_QUIET_ENV, **WORKER_ONLY_ENV}}
