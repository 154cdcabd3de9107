"""The sweep's space and trials, without Ray: what a trial's config means as params, the name of
a sweep, and the space in Ray Tune's terms (param_space imports ray.tune only when called).

A trial's config is keyed by the dotted params key (`train.learning_rate`), as in params.yaml's
tune.space. A value that is a list (model.hidden_sizes: [512, 256]) travels as its JSON text,
"[512, 256]": search algorithms such as Optuna take only numbers and strings as choices, and
MLflow shows the text as the parameter's value.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from dltrain.config import (
    Params,
    apply_overrides,
    params_from_dict,
    space_entry,
    trial_epochs,
)
from dltrain.paths import TUNE_RUN_PREFIX


def encode(value: Any) -> Any:
    """A space value as a trial's config holds it: lists as JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple)) else value


def decode(value: Any) -> Any:
    """A trial config's value as params take it (and as reports/tune.json shows it)."""
    if isinstance(value, str) and value.startswith("["):
        return json.loads(value)
    return value


def trial_values(config: dict[str, Any], params: Params) -> dict[str, Any]:
    """The space's keys of a trial's config, decoded, in the order of tune.space."""
    return {key: decode(config[key]) for key in params.tune.space if key in config}


def trial_params(params: Params, config: dict[str, Any]) -> Params:
    """The params a trial trains with: `params` with the trial's values set."""
    values = trial_values(config, params)
    return params_from_dict(apply_overrides(params.to_dict(), values))


def planned_epochs(params: Params, config: dict[str, Any]) -> int:
    """The epochs a trial trains unless the scheduler stops it."""
    return int(trial_values(config, params).get("train.epochs", params.train.epochs))


def max_epochs(params: Params) -> int:
    return max(trial_epochs(params))


def trial_count(params: Params) -> int:
    """How many trials the sweep runs: num_samples, times each grid's length."""
    grids = [len(space_entry(key, spec)[1]) for key, spec in params.tune.space.items()
             if isinstance(spec, dict) and "grid" in spec]
    return params.tune.num_samples * math.prod(grids)


def sweep_name(params: Params, summary: dict[str, Any]) -> str:
    """The sweep's directory name under the run storage: the same space, search settings, data
    and fixed params -> the same sweep, which a re-run resumes; anything else is a new sweep.
    Keys the space varies do not count at their params.yaml value (so `--apply` writing the
    winner does not make a new sweep), nor where and how trials run."""
    t = params.tune
    base = params.to_dict()
    for key in t.space:
        section, _, name = key.partition(".")
        base[section].pop(name, None)
    inputs = {
        "space": t.space,
        "search": t.model_dump(mode="json", include={"num_samples", "metric", "mode",
                                                      "scheduler", "grace_period",
                                                      "reduction_factor", "search", "seed",
                                                      "baseline"}),
        "model": base["model"],
        "train": {k: v for k, v in base["train"].items()
                  if k not in ("ray_address", "storage_path", "max_failures")},
        "data": {"raw": summary.get("data_checksum"),
                 **{s: (summary.get(s) or {}).get("sha256") for s in ("train", "val", "test")}},
    }
    blob = json.dumps(inputs, sort_keys=True, default=str)
    return f"{TUNE_RUN_PREFIX}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def baseline(params: Params) -> dict[str, Any] | None:
    """params.yaml's own values of the space's sampled keys, as a trial's config (a search's
    points_to_evaluate); None when one lies outside its distribution, with a grid in the space
    (a point would replace grid values), or with tune.baseline off."""
    if not params.tune.baseline:
        return None
    current = params.to_dict()
    point = {}
    for key, spec in params.tune.space.items():
        kind, args = space_entry(key, spec)
        section, _, name = key.partition(".")
        value = current[section][name]
        if kind is None:
            continue
        if kind == "grid":
            return None
        if kind == "choice":
            inside = encode(value) in [encode(v) for v in args]
        else:
            high_ok = value < args[1] if kind == "randint" else value <= args[1]
            inside = isinstance(value, (int, float)) and args[0] <= value and high_ok
        if not inside:
            return None
        point[key] = encode(value)
    return point or None


def param_space(params: Params) -> dict[str, Any]:
    """tune.space as Ray Tune's param_space (fixed values included, so every trial's config,
    and its MLflow params, show them)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in params.tune.space.items():
        kind, args = space_entry(key, spec)
        if kind is None:
            space[key] = encode(args[0])
        elif kind == "choice":
            space[key] = tune.choice([encode(v) for v in args])
        elif kind == "grid":
            space[key] = tune.grid_search([encode(v) for v in args])
        elif kind == "loguniform":
            space[key] = tune.loguniform(*args)
        elif kind == "uniform":
            space[key] = tune.uniform(*args)
        else:
            space[key] = tune.randint(*args)
    return space
