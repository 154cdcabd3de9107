"""`dltrain predict` on one PNG from the registry (models:/mnist-mlp@champion) against the same
command on the model file itself (the floor: no registry at all).

A scratch SQLite store gets one registered version, logged as register logs it (the MLflow pyfunc
model of dltrain.registry.mlflow_model) with random weights of the default 784-512-10 shape. The
first registry call after the store was written resolves the alias through MLflow (MLflow's import
and store); later calls use dltrain.registry.cache while the store is unchanged.
Target: a cached registry call <= 1.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIN, REPO, env, machine  # noqa: E402
from report import replace_section  # noqa: E402

TARGET_S = 1.5
NOTE = ("Before the cache, every registry call paid the first call's cost (MLflow's import and "
        "store: 6.2 s on a busy host). Only the embedded SQLite store is stamped; a tracking "
        "server is asked on every call which weights the alias names, with one request of its "
        "public REST API (`GET /api/2.0/mlflow/registered-models/alias`, no MLflow import), "
        "and they come from the cache once fetched (not timed here; with MLflow's auth or TLS "
        "settings set, MLflow's client asks instead).")


def make_store(root: Path) -> tuple[str, Path, Path]:
    """(tracking URI, model file, PNG): a registered champion and the same weights on disk."""
    from PIL import Image
    from safetensors.numpy import save

    from dltrain.model.architecture import architecture, expected_shapes
    from dltrain.model.weights import write_model_pair
    from dltrain.registry import mlflow_model
    from dltrain.tracking.store import connect, embedded_artifact_uri

    rng = np.random.default_rng(0)
    state = {k: rng.normal(0, 0.05, shape).astype(np.float32)
             for k, shape in expected_shapes([512]).items()}
    model = root / "models" / "model.safetensors"
    model.parent.mkdir(parents=True)
    sha = write_model_pair(save(state), {"architecture": architecture([512]),
                                         "data": {"dataset": "fashion-mnist"}}, model)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = connect(uri)
    experiment = client.create_experiment("bench", artifact_location=embedded_artifact_uri(root))
    run_id = client.create_run(experiment).info.run_id
    images = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    logged = mlflow_model.log_model(client, run_id, model, model.with_suffix(".json"),
                                    "# bench\n", sha, images)
    client.create_registered_model("mnist-mlp")
    version = client.create_model_version("mnist-mlp", logged.artifact_location, run_id=run_id,
                                          model_id=logged.model_id)
    client.set_registered_model_alias("mnist-mlp", "champion", version.version)
    png = root / "one.png"
    Image.fromarray(images[0], mode="L").save(png)
    return uri, model, png


def predict(model: str, uri: str, png: Path, cwd: Path) -> float:
    args = [str(BIN / "dltrain"), "predict", "--model", model, "--tracking-uri", uri, str(png)]
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env(), check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri, model, png = make_store(root)
        ref = "models:/mnist-mlp@champion"
        # The cache keeps an alias only once the store's last write is settled (2 s old).
        time.sleep(2.5)
        cold = predict(ref, uri, png, root)
        floor, cached = [], []
        for _ in range(args.repeats):  # alternated, so that the host's load hits both alike
            floor.append(predict(str(model), uri, png, root))
            cached.append(predict(ref, uri, png, root))
    f, c = statistics.median(floor), statistics.median(cached)
    lines = ["| `dltrain predict` on one PNG | seconds | ratio to floor |", "|---|---|---|",
             f"| `--model models/model.safetensors` (floor) | {f:.2f} | 1.00 |",
             f"| `--model {ref}`, first call after a write to the store (MLflow resolves "
             f"the alias) | {cold:.2f} | {cold / f:.2f} |",
             f"| `--model {ref}`, store unchanged (dltrain.registry.cache) | {c:.2f} | "
             f"{c / f:.2f} |"]
    verdict = "met" if c <= TARGET_S else "NOT met"
    table = "\n".join(lines) + (f"\n\nTarget: a registry call <= {TARGET_S} s ({c:.2f} s: "
                                f"{verdict}); medians of {args.repeats}, the first call once. "
                                f"{NOTE}")
    print(table)
    if args.write:
        body = (f"Machine: {machine()}.\n\nCommand: `.venv/bin/python bench/predict_registry.py "
                f"--repeats {args.repeats} --write`\n\n{table}\n")
        replace_section(REPO / "BENCHMARKS.md", "Predict from the registry", body)


if __name__ == "__main__":
    main()
