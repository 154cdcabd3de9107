"""The sweep's progress lines, from a Ray Tune callback on the driver: a line when a trial starts
and one when it ends (completed, stopped early by the scheduler, or failed), numbered.

Imports ray: dltrain.tune.sweep imports it once the driver's Ray settings are in place. Ray Tune
keeps the callback (pickled, with the sweep's RunConfig) for a resumed sweep: it holds plain
values only.
"""

from __future__ import annotations

import sys
from typing import Any

from ray.tune import Callback

from dltrain.config import Params
from dltrain.tune.space import planned_epochs, trial_values


def say(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()


def _values(params: Params, config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in trial_values(config, params).items())


class Progress(Callback):
    def __init__(self, params: Params, total: int) -> None:
        self.params, self.total = params, total

    def _ended(self, trials: list[Any], trial: Any) -> int:
        return sum(1 for t in trials if t is trial or t.status in ("TERMINATED", "ERROR"))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        say(f"trial {trial.trial_id} started: {_values(self.params, trial.config)}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("epoch") or 0)
        planned = planned_epochs(self.params, trial.config)
        how = "completed" if epochs >= planned else "stopped early by ASHA"
        metric = self.params.tune.metric
        figure = result.get(metric)
        say(f"[{self._ended(trials, trial)}/{self.total}] trial {trial.trial_id} {how} after "
            f"{epochs} of {planned} epochs"
            + (f": {metric} {figure:.4f}" if isinstance(figure, (int, float)) else ""))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch") or 0)
        say(f"[{self._ended(trials, trial)}/{self.total}] trial {trial.trial_id} failed after "
            f"{epochs} epochs (its error: reports/tune.json)")
