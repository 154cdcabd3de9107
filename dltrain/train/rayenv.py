"""What every Ray process of a training run is given: quiet settings and a setup hook; and
what the driver drops of what Ray prints (NoiseFilter).

A module without torch or Ray Train at the top: Ray imports it in every process it starts for
the run (the Train controller, its helper actors, the workers) to run the setup hook. Nor does
it import ray at the top: its settings must be in the environment before ray is imported.

Only settings that Ray documents are used: `runtime_env` (`env_vars`,
`worker_process_setup_hook`), Ray's usage-stats and log-deduplication switches, and the
Ray Train variables its debugging guide lists (controller poll interval, worker-group start
timeout, Train metrics).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, TextIO

# For every Ray process of the run. Set before ray is imported.
RAY_QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Nothing scrapes the Prometheus metrics of a pipeline run.
    "RAY_TRAIN_METRICS_ENABLED": "0",
    # The controller polls its workers this often, and a worker's report() waits for that poll:
    # the default 2 s adds up to 2 s at the start, at the end and to every epoch of a run; a
    # poll is one cheap call per worker.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    # Starting the worker group (new processes importing torch) can take over a minute on a
    # busy small machine; the default would fail the run for it.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_DEDUP_LOGS": "1",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}
# Ray Train runs the training function in a thread of the worker process. libgomp (torch's
# OpenMP) gives each calling thread its own team, and once the worker's main thread has run a
# parallel region with a team of its own, the training thread's team competes with it for the
# cores and its parallel regions run markedly slower (BENCHMARKS.md, "Figures behind choices in
# the code", gives the figure).
# With OMP_NUM_THREADS=1 the main thread never builds a team; the training thread sets its own
# count (torch.set_num_threads, dltrain.train.loop).
WORKER_ONLY_ENV = {"OMP_NUM_THREADS": "1"}
# Ray Train's console log level (RunConfig's LoggingConfig): its warnings are about things a
# pipeline user can do nothing about (a state-API query of the placement-group cleaner that
# answered slowly on a busy machine, the teardown of a process group after a worker died);
# the run's outcome reaches the user as one line (dltrain.train.stage). Errors still show.
RAY_TRAIN_LOG_LEVEL = "ERROR"
# "1" in the driver's own environment; "0" in the runtime env of every Ray process of the job.
DRIVER_ENV = "DLTRAIN_RAY_DRIVER"


# Ray Train's controller creates a PreemptionWatcher actor with max_restarts=-1 and
# constructor arguments that Ray keeps in the object store, and Ray's core worker logs an
# error for every such actor: https://github.com/ray-project/ray/issues/53727 (actor restarts
# with creation arguments in the object store). The line reads like a failure on every run
# and is none; no documented setting avoids it. Only a line that holds all of these strings
# is dropped: every other error of Ray's still shows.
KNOWN_NOISE = ("core_worker.cc", "Actor with class name: 'PreemptionWatcher'",
               "max_restarts > 0", "ray-project/ray/issues/53727")


class NoiseFilter:
    """A stand-in for sys.stderr while this driver is connected to Ray: Ray prints the error
    output of the job's processes there (log_to_driver). Whole lines pass on to the stream
    it replaced, less the lines of KNOWN_NOISE; a flush passes a partial line on too."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        kept = [line for line in lines if not all(s in line for s in KNOWN_NOISE)]
        if kept:
            self.stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.stream.write(self._partial)
            self._partial = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)

    @classmethod
    def install(cls) -> NoiseFilter:
        sys.stderr = noise = cls(sys.stderr)
        return noise

    def remove(self) -> None:
        self.flush()
        if sys.stderr is self:
            sys.stderr = self.stream


def quiet_worker() -> None:
    """worker_process_setup_hook: runs in every Ray process of this job (and the driver)."""
    # Processes that Ray Train does not configure itself (its placement-group cleaner warns
    # every second that the state API is unavailable, which a Ray without a dashboard is).
    logging.getLogger("ray.train").setLevel(RAY_TRAIN_LOG_LEVEL)
    # Ray Train's helper actors look "the" cluster up through RAY_ADDRESS; without it they
    # query another Ray when one more runs on the machine ("Found multiple active Ray
    # instances"). The driver is left alone: it decides its own Ray (dltrain.train.connect).
    import ray

    if ray.is_initialized() and os.environ.get(DRIVER_ENV) != "1":
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def runtime_env() -> dict:
    """A value the driver's environment sets (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=1, say) wins
    over the default, in every process of the run."""
    quiet = {key: os.environ.get(key, value) for key, value in RAY_QUIET_ENV.items()}
    return {"worker_process_setup_hook": "dltrain.train.rayenv.quiet_worker",
            "env_vars": {**quiet, **WORKER_ONLY_ENV, DRIVER_ENV: "0"}}


def set_driver_env() -> None:
    """The quiet settings in this process, before it imports ray."""
    for key, value in RAY_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ[DRIVER_ENV] = "1"
    if not sys.stdout.isatty():
        # No colour codes in a log file, DVC's or Prefect's capture of the output.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
