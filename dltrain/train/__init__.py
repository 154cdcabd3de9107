"""The train stage, on Ray Train's public API:

    preflight.py  the data, the resources, which run this is (before any Ray process starts)
    connect.py    which Ray: a private one, the workspace's warm one, or a cluster
    rayenv.py     what every Ray process of the run is given (quiet settings, a setup hook)
    worker.py     the function each Ray Train worker runs around dltrain.train.loop
    storage.py    the checkpoints' storage path, checked, and finished-run markers
    outputs.py    models/model.safetensors, its card and reports/training.json
    live.py       live tracking: the run's MLflow run, fed from a thread of the driver
    liveproc.py   the same from a child process, in local mode (the driver trains there)
    epochlog.py   the Train controller's callback that writes each committed epoch for it
    stage.py      train(): the above in order
    loop.py       the per-worker loop: plain PyTorch, runnable in-process
    loopconfig.py what the driver and its workers share without torch: the loop's config,
                  the files of a checkpoint

Every Ray call of the project lives in this package (and the cluster helpers in infra/); the
loop itself (loop.py) is plain PyTorch.
"""
