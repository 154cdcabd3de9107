"""What one trial runs, in a Ray Tune trial's process: the product's training, its epochs
reported to Tune so that the scheduler can stop a poor trial.

A 1-worker trial (train.num_workers 0 or 1) runs the training function in Ray Train's local mode
(ScalingConfig(num_workers=0)) inside the trial: dltrain.train.loop's per-worker loop, in the
trial's own process, each epoch reported with ray.tune.report. Ray Train's own report() refuses
to run inside a Tune trial (ray.train's API raises in a Tune session and points to ray.tune's),
so the function reports to Tune directly.

A multi-worker trial follows Ray's Train V2 + Tune pattern: the trial runs a driver function that
builds a TorchTrainer of dltrain.train.worker's training function, whose reports
ray.tune.integration.ray_train.TuneReportCallback passes on to Tune.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dltrain.config import Params
from dltrain.errors import CertainTrainingError
from dltrain.train.loopconfig import LoopConfig
from dltrain.tune.space import trial_params

# What a trial reports each epoch (dltrain.train.loop.EpochRecord's figures).
REPORTED = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_time_s")


def loop_config(params: Params, processed_dir: str, threads: int) -> LoopConfig:
    t = params.train
    return LoopConfig(processed_dir=processed_dir, hidden_sizes=tuple(params.model.hidden_sizes),
                      epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
                      optimizer=t.optimizer, seed=t.seed, threads=threads,
                      ema_decay=t.ema_decay)


def tune_fn_per_worker(config: dict[str, Any]) -> None:
    """The training function of a 1-worker trial: the loop, each epoch reported to Tune."""
    import ray.tune

    from dltrain.train.loop import train_loop

    def on_epoch_end(record: Any, snapshot: Any) -> None:
        figures = asdict(record)
        ray.tune.report({key: figures[key] for key in REPORTED})

    train_loop(LoopConfig(**config["loop"]), on_epoch_end=on_epoch_end)


def run_trial(config: dict[str, Any], *, params: Params, processed_dir: str,
              threads: int) -> None:
    """A 1-worker trial (tune.with_parameters supplies the keyword arguments)."""
    import logging

    import ray.train
    from ray.train.torch import TorchTrainer

    logging.getLogger("ray.train").setLevel(logging.ERROR)  # local mode's INFO lines
    trial = trial_params(params, config)
    loop = loop_config(trial, processed_dir, threads)
    TorchTrainer(tune_fn_per_worker, train_loop_config={"loop": asdict(loop)},
                 scaling_config=ray.train.ScalingConfig(num_workers=0,
                                                        use_gpu=trial.train.use_gpu),
                 ).fit()


def run_trial_workers(config: dict[str, Any], *, params: Params, processed_dir: str,
                      threads: int, storage: str) -> None:
    """A multi-worker trial: this driver function builds a TorchTrainer whose worker group
    trains; its run directory is the trial's, under the sweep's (`storage`)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from dltrain.train import rayenv
    from dltrain.train.storage import KEEP_CHECKPOINTS, read_failure
    from dltrain.train.worker import train_fn_per_worker

    trial = trial_params(params, config)
    t = trial.train
    name = ray.tune.get_context().get_trial_name()
    loop = loop_config(trial, processed_dir, threads)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"loop": asdict(loop), "use_gpu": t.use_gpu, "progress": None,
                           "storage": storage, "name": name},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": threads},
            placement_strategy=t.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=[TuneReportCallback()],
            logging_config=ray.train.LoggingConfig(log_level=rayenv.RAY_TRAIN_LOG_LEVEL)))
    trainer.fit()
    # A certain failure (a non-finite loss) ends the worker group without Ray Train's retries
    # (dltrain.train.worker): the trial fails with its message.
    failure = read_failure(storage, name, remove=True)
    if failure:
        raise CertainTrainingError(failure)
