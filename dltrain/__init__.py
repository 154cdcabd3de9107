"""dltrain: the MLP-on-MNIST program as a training pipeline (DVC, Ray Train, MLflow, Prefect).

Each stage is a `dltrain` subcommand (cli.py); the role packages below it hold their code:
data/ (check, download, preprocess), train/, evaluate/, registry/ (register, predict), over
model/ and tracking/. DVC lists this file as a dependency of every stage, so it is never left
empty: DVC warns about an empty dependency on every run.
"""
