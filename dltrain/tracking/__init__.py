"""MLflow tracking, below training and the registry: which store, and the run of a training.

    store.py  the tracking store: its URI (embedded SQLite or a server), connecting, redaction
    runs.py   the MLflow run of a training run: find it, log its params and epochs (what the
              train stage and register share; register's completion is dltrain.registry.runlog)
"""
