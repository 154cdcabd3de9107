"""How the train stage's driver learns that an epoch ended: each committed epoch is written into
the run directory, for live tracking (dltrain.train.live) to send. On a worker group a Ray Train
callback writes it; in local mode (train.num_workers 0), where RunConfig callbacks do not run,
the training function calls record_epoch itself once the epoch's checkpoint is kept.

`ray.train.UserCallback` (Ray Train's documented callback interface, passed in RunConfig) runs
on the Train controller. Its `after_report` is called once every worker has reported the epoch
and the checkpoint is registered, so an epoch cut short by a worker failure never gets a file;
its re-run does. The file is written whole or not at all (dltrain.train.storage.write_epoch).

The controller is a Ray process: nothing of MLflow is imported here. A failed write never fails
training: the epoch is in the next checkpoint's history and in reports/training.json anyway.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train import UserCallback

from dltrain.train.storage import write_epoch


class EpochLog(UserCallback):
    def __init__(self, storage: str, name: str) -> None:
        self.storage, self.name = storage, name

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]],
                     checkpoint: Any) -> None:
        # Rank 0's report: the epoch's figures are reduced over all workers already.
        record_epoch(self.storage, self.name, metrics[0] if metrics else {})


def record_epoch(storage: str, name: str, metrics: dict[str, Any]) -> None:
    """Rank 0's reported `metrics` of one epoch into the run directory; never raises."""
    record = {k: v for k, v in metrics.items() if k != "nodes"}
    if "epoch" not in record:
        return
    try:
        write_epoch(storage, name, record)
    except Exception as exc:  # noqa: BLE001  (tracking must never fail training)
        logging.getLogger(__name__).warning("could not record epoch %s for MLflow: %s",
                                            record["epoch"], exc)
