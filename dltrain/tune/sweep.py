"""`dltrain tune`: run (or resume) the sweep that params.yaml's tune: section describes.

Trials run concurrently on the Ray that train.ray_address names (dltrain.train.connect: the
workspace's warm Ray, a cluster, or a private one), packed by the CPUs each asks for: a 1-worker
trial asks for train.threads_per_worker CPUs (default 1) and trains with that many torch
threads, so trials never oversubscribe the cores; a multi-worker trial's driver asks for none
and its TorchTrainer's workers for theirs, at most as many trials at once as the CPUs hold.

The sweep lives in its own directory under the run storage (train.storage_path, as training
runs do), named by dltrain.tune.space.sweep_name. A re-run with the same space finds Ray Tune's
state there and restores it (Tuner.can_restore / Tuner.restore): finished trials are kept,
unfinished ones run again, and, for an interrupted sweep, so do failed ones. Ray Tune saves
its state every TUNE_GLOBAL_CHECKPOINT_S seconds (a documented Tune setting; 1 here), and whole
when Ctrl-C or SIGTERM stops the sweep (_StopOnSignal).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import time
from typing import Any

from dltrain.atomic import check_writable, write_json
from dltrain.config import Params, check_schedule
from dltrain.errors import ConfigError, TrainingError
from dltrain.paths import Workspace
from dltrain.train import connect, rayenv
from dltrain.train.preflight import check_memory, check_processed, local_cpus
from dltrain.train.storage import check_storage, resolve_storage
from dltrain.tune.report import build_report, summary_lines, trial_dirname
from dltrain.tune.space import baseline, max_epochs, param_space, sweep_name, trial_count
from dltrain.tune.tracking import SweepRun, find_sweep_run

APPLY_COMMAND = "dltrain tune --apply-only"
# Ray Tune's experiment-state period: a killed sweep loses at most this much of its record.
CHECKPOINT_PERIOD_S = "1"
SEARCH_PACKAGES = {"optuna": "optuna", "hyperopt": "hyperopt"}
DRIVER_MEMORY = 256 * 2**20  # what a multi-worker trial's driver function asks Ray for


def say(line: str) -> None:
    print(line, flush=True)


def tune(params: Params, ws: Workspace) -> dict[str, Any]:
    """Run or resume the sweep; write reports/tune.json and return it."""
    started = time.perf_counter()
    t = params.tune
    if not t.space:
        raise ConfigError("params.yaml has no tune.space: add a tune: section with the keys to "
                          "vary (see the example in the README's Tune section)")
    check_schedule(params)
    _check_search(t.search)
    summary = check_processed(ws.processed_dir, params.data.dataset)
    check_writable(ws.tune_report_path)
    storage = resolve_storage(params.train.storage_path, ws)
    check_storage(storage)
    name = sweep_name(params, summary)
    target, note = connect.resolve(params.train.ray_address, ws)
    if note:
        say(note)
    if target.local:
        check_memory(params, _available(), "this machine")
    mlflow = SweepRun(params, ws, name)
    previous = find_sweep_run(mlflow.client, mlflow.experiment_id, name)

    connect.export_env(target)
    rayenv.set_driver_env()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", CHECKPOINT_PERIOD_S)
    # Ray Tune's legacy console output, which verbose=0 silences whole (the newer one still
    # prints a header box); the sweep prints its own lines (dltrain.tune.progress).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    say(f"starting {target.where} ({local_cpus()} CPUs)" if target.local
        else f"connecting to {target.where}")
    connect_s = connect.connect(target, local_cpus(), rayenv.runtime_env(), log_to_driver=False)
    import ray

    for logger in ("ray.tune", "ray.train", "ray.air"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        trainable, concurrent, per_trial = _trainable(params, ws, storage, name)
        path = f"{storage.rstrip('/')}/{name}"
        tuner, resumed = _tuner(params, trainable, storage, name, path, concurrent, mlflow,
                                previous)
        total = trial_count(params)
        say(f"Ray ready in {connect_s:.1f}s (Ray {ray.__version__}); "
            + (f"resuming sweep {name}" if resumed else f"sweep {name}") + f": {total} trials "
            f"of up to {max_epochs(params)} epochs, {per_trial}, "
            + (f"at most {concurrent} at once" if concurrent else "as many at once as fit")
            + f"; {t.scheduler.upper()} on {t.metric} ({t.objective_mode}), {t.search} search")
        with _StopOnSignal() as stop:
            grid = tuner.fit()
        if stop.signalled:
            mlflow.finish_interrupted()
            say(f"stopped: Ray Tune saved the sweep; `dltrain tune` resumes sweep {name} (its "
                "finished trials are kept)")
            raise KeyboardInterrupt
        results = list(grid)
        report = build_report(params, results, {
            "name": name, "mlflow_run_id": mlflow.run_id, "experiment": mlflow.experiment,
            "storage": path, "wall_s": round(time.perf_counter() - started, 1)})
        mlflow.finish(report)
        write_json(ws.tune_report_path, report)
    finally:
        ray.shutdown()
    for line in summary_lines(report, APPLY_COMMAND):
        say(line)
    return report


def _available() -> int:
    from dltrain.train.preflight import available_memory

    return available_memory()


def _check_search(search: str) -> None:
    package = SEARCH_PACKAGES.get(search)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"tune.search is {search}, but the {package} package is not "
                          f"installed: pip install 'dltrain[tune]' (or {package}), or set "
                          "tune.search: random")


def _trainable(params: Params, ws: Workspace, storage: str, name: str
               ) -> tuple[Any, int | None, str]:
    """The trial function with its resources, how many trials may run at once (None: as many
    as the resources allow), and the per-trial resources in words."""
    import ray
    from ray import tune

    from dltrain.tune.trial import run_trial, run_trial_workers

    t = params.train
    processed = str(ws.processed_dir.resolve())
    cpus = ray.cluster_resources().get("CPU", 0.0)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    threads = t.threads_per_worker or 1
    workers = max(1, t.num_workers)
    if workers * threads > cpus or (t.use_gpu and workers > gpus):
        raise TrainingError(
            f"a trial needs {workers * threads} CPUs" + (f" and {workers} GPUs" if t.use_gpu
                                                          else "")
            + f", but the Ray has {cpus:g} CPUs and {gpus:g} GPUs; lower train.num_workers "
              "or train.threads_per_worker")
    concurrent = params.tune.max_concurrent_trials
    if workers == 1:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, params=params, processed_dir=processed,
                                 threads=threads),
            {"cpu": threads, "gpu": 1 if t.use_gpu else 0})
        return trainable, concurrent, (f"each on {threads} CPU{'s' if threads > 1 else ''} "
                                       "(Ray Train local mode in the trial)")
    # Ray's Train V2 + Tune pattern: the trial runs a driver function, and Tune is told how
    # many trials' worker groups fit at once (max_concurrent_trials). The driver only waits on
    # its workers: it asks for memory, not for a CPU (Ray's default of 1 would leave a 2-CPU
    # machine one short for a 2-worker trial); its TorchTrainer's workers ask for theirs.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial_workers, params=params, processed_dir=processed,
                             threads=threads, storage=f"{storage.rstrip('/')}/{name}-train"),
        {"cpu": 0, "memory": DRIVER_MEMORY})
    fit = max(1, int(cpus // (workers * threads)))
    return trainable, min(concurrent or fit, fit), f"each {workers} Ray Train workers x " \
        f"{threads} CPU"


def _tuner(params: Params, trainable: Any, storage: str, name: str, path: str,
           concurrent: int | None, mlflow: SweepRun, previous: Any) -> tuple[Any, bool]:
    """A Tuner restored from the sweep's state when there is one, else a new one."""
    from ray import tune

    # The sweep's parent run again when this resumes it, or when an earlier attempt opened it
    # and stopped before Ray Tune saved anything; a new one for a finished sweep whose Tune
    # state was deleted (it runs again).
    restorable = previous is not None and tune.Tuner.can_restore(path)
    again_parent = previous is not None and (restorable or previous.info.status != "FINISHED")
    mlflow.open(previous.info.run_id if again_parent else None)
    if restorable:
        # A finished sweep restores as it is (its failed trials stay failed); an interrupted
        # one also runs its failed trials again.
        again = previous.info.status != "FINISHED"
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  restart_errored=again, param_space=param_space(params)), True
    t = params.tune
    mode = t.objective_mode
    from dltrain.tune.progress import Progress

    tuner = tune.Tuner(
        trainable, param_space=param_space(params),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=mode, num_samples=t.num_samples,
            scheduler=_scheduler(params), search_alg=_search(t.search, t.seed, baseline(params)),
            max_concurrent_trials=concurrent, trial_dirname_creator=trial_dirname,
            # A new process per trial: with reuse, a trial the scheduler stopped went on
            # reporting epochs, which Tune counted as the next trial's.
            reuse_actors=False),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            callbacks=[Progress(params, trial_count(params)), mlflow.logger()]))
    return tuner, False


def _scheduler(params: Params) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    t = params.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr "epoch": the epoch each report names, also for a trial resumed mid-way.
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs(params),
                         grace_period=t.grace_period, reduction_factor=t.reduction_factor)


def _search(search: str, seed: int, first: dict[str, Any] | None) -> Any:
    """The search algorithm; `first`, the baseline trial's config, is its first point."""
    points = [first] if first else None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed, points_to_evaluate=points)
    if search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=seed, points_to_evaluate=points)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, points_to_evaluate=points)


class _StopOnSignal:
    """While the sweep runs, Ctrl-C (SIGINT) or a process manager's SIGTERM stops it the way
    Ray Tune stops on Ctrl-C: its trials end and its state is saved as it was, unfinished trials
    unfinished, for a re-run to resume. Ray Tune's own SIGINT handler is off
    (TUNE_DISABLE_SIGINT_HANDLER) so that the sweep knows it was stopped (Tune's result then
    reads as if every trial ended); this one passes the stop on as SIGUSR1, to which Ray Tune's
    Tuner.fit() answers with the same stop. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _StopOnSignal:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read when fit() starts
        self.signalled = False
        self.previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self._stop)
        return self

    def _stop(self, signum: int, frame: Any) -> None:
        if self.signalled:
            raise KeyboardInterrupt
        self.signalled = True
        say(f"stopping ({signal.Signals(signum).name}): ending the trials and saving the sweep")
        os.kill(os.getpid(), signal.SIGUSR1)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
