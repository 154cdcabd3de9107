"""The registry role: the register stage and everything that reads the MLflow model registry.

    register.py      the register stage: log the model, then the gate decides the alias
    candidate.py     what the stage registers: the model's card, metrics and lineage tags
    runlog.py        completing the training's MLflow run: metrics, params, model, reports
    gate.py          the rule: when a challenger becomes champion
    promotion.py     moving aliases by that rule, recorded in the history
    history.py       the alias moves, as tags on the registered model
    mlflow_model.py  the logged MLflow model (pyfunc over the safetensors weights)
    pyfunc_model.py  its model-from-code, what MLflow loads and serves
    predict.py       `dltrain predict`: a local model or models:/NAME@ALIAS
    cache.py         predict's local cache of registered versions
    commands.py      `dltrain registry history` and `rollback`
"""
