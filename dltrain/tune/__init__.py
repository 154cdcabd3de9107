"""Hyperparameter search on Ray Tune (`dltrain tune`): the sweep over params.yaml's `tune.space`,
its report (reports/tune.json), and applying the winner to params.yaml (dltrain.tune.apply)."""
