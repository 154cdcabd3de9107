"""`dltrain tune`: a hyperparameter sweep on Ray Tune over the `tune:` section of params.yaml.

Each trial trains with the product's own per-worker loop (dltrain.train), on the Ray that
train.ray_address names; the sweep is tracked in MLflow (a parent run, a child run per trial),
written to reports/tune.json, and resumed from Ray Tune's state when interrupted. A sweep
never registers a model: its winner reaches the registry only through params.yaml and the
ordinary pipeline (`dltrain tune --apply`, then `dvc repro`).
"""
