"""The registered model as an MLflow model, so that MLflow's own API loads and serves it:

    mlflow.pyfunc.load_model("models:/mnist-mlp@champion").predict(images)
    mlflow models serve -m models:/mnist-mlp@champion --env-manager local

register logs it into the training run as an MLflow 3 logged model: a pyfunc "model from code"
(dltrain/registry/pyfunc_model.py) whose artifacts are the safetensors weights and their card,
with the dltrain modules that file imports as its code (model_code: the weights reader, not the
training or Ray code), a signature (uint8 images (-1, 28, 28) in, float32 probabilities (-1, 10)
out), an input example, its pip requirements and the markdown model card. No pickle: MLflow
loads it by running that file, which reads the weights with safetensors.

mlflow is imported inside the functions that log, never at import: `dltrain predict` imports
this module for `weights_in`, and must start fast.
"""

from __future__ import annotations

import json
import modulefinder
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.model.architecture import NUM_CLASSES
from dltrain.paths import ModelFiles, split_paths

MODEL_NAME = "model"  # the logged model's name in its run
ARTIFACT_WEIGHTS = "weights"  # context.artifacts keys in dltrain/registry/pyfunc_model.py
ARTIFACT_CARD = "card"
ARTIFACTS_DIR = "artifacts"  # where pyfunc puts them in the model's folder
MODEL_CARD_FILE = "model_card.md"
WEIGHTS_SHA256_TAG = "weights_sha256"  # on the logged model: which weights it holds
# The logged model's tag listing its registered versions, as MLflow's own register_model
# writes it and its UI reads it ([{"name": ..., "version": ...}], JSON).
MLFLOW_MODEL_VERSIONS = "mlflow.modelVersions"
IMAGE_SHAPE = (28, 28)
INPUT_EXAMPLE_SIZE = 2  # test images in the input example (the UI and `serve` show it)


PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def model_code(dst: Path) -> Path:
    """Copy into dst/dltrain the modules of dltrain that the pyfunc code imports, at any depth
    (function-level imports too), and nothing else; return dst/dltrain, the model's code_paths.

    The logged model carries only what loading it runs, so a model logged by one version of
    dltrain keeps working beside another, and its code holds no training or Ray code."""
    package = Path(__file__).resolve().parents[1]
    # Searching only the folder that holds dltrain: third-party imports stay unresolved,
    # which is what is wanted (they are the model's pip requirements, not its code).
    finder = modulefinder.ModuleFinder(path=[str(package.parent)])
    finder.run_script(str(PYFUNC_CODE))
    for name, module in finder.modules.items():
        if name == "dltrain" or name.startswith("dltrain."):
            source = Path(module.__file__)
            target = dst / source.relative_to(package.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return dst / package.name


def weights_in(folder: Path) -> Path:
    """The weights file in a downloaded model version: artifacts/model.safetensors of an MLflow
    model, or model.safetensors at the top of a version registered as loose files."""
    folder = Path(folder)
    for candidate in (ModelFiles(folder / ARTIFACTS_DIR).weights, ModelFiles(folder).weights):
        if candidate.is_file():
            return candidate
    return ModelFiles(folder / ARTIFACTS_DIR).weights  # missing: the loader says so


def example_images(processed_dir: Path) -> np.ndarray | None:
    """The first test images, as the model's input example; None when there are none."""
    try:
        images = np.load(split_paths(processed_dir, "test")[0], mmap_mode="r")
    except (OSError, ValueError):
        return None
    return np.array(images[:INPUT_EXAMPLE_SIZE], dtype=np.uint8) if len(images) else None


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *IMAGE_SHAPE), name=None)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]))


def pip_requirements() -> list[str]:
    """What loading and serving need, at the versions that logged it: no torch."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "numpy", "safetensors")]


def run_model(client: Any, run_id: str, weights_sha256: str) -> Any | None:
    """The READY logged model of `run_id` that holds these weights, if it was logged already
    (a re-run of register continues the same run: it does not log the model twice)."""
    from mlflow.entities import LoggedModelStatus

    outputs = client.get_run(run_id).outputs
    for output in reversed(outputs.model_outputs if outputs else []):
        model = client.get_logged_model(output.model_id)
        if (model.status == LoggedModelStatus.READY
                and model.tags.get(WEIGHTS_SHA256_TAG) == weights_sha256):
            return model
    return None


def log_model(client: Any, run_id: str, model_path: Path, card_path: Path, card_markdown: str,
              weights_sha256: str, input_example: np.ndarray | None = None) -> Any:
    """Log the MLflow model of these weights into run `run_id` (once); return the LoggedModel,
    whose artifact_location a model version's source points to."""
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    existing = run_model(client, run_id, weights_sha256)
    if existing is not None:
        return existing
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME,
                                       source_run_id=run_id,
                                       tags={WEIGHTS_SHA256_TAG: weights_sha256},
                                       model_type="mnist-mlp")
    try:
        with tempfile.TemporaryDirectory(prefix="dltrain-mlflow-model-") as tmp:
            local = Path(tmp) / MODEL_NAME
            meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id,
                         run_id=run_id, model_id=model.model_id)
            mlflow.pyfunc.save_model(
                local, python_model=str(PYFUNC_CODE),
                artifacts={ARTIFACT_WEIGHTS: str(model_path), ARTIFACT_CARD: str(card_path)},
                code_paths=[str(model_code(Path(tmp) / "code"))], signature=signature(),
                input_example=input_example, pip_requirements=pip_requirements(), mlflow_model=meta)
            (local / MODEL_CARD_FILE).write_text(card_markdown)
            client.log_model_artifacts(model.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def link_version(client: Any, model: Any, name: str, version: int | str) -> None:
    """Record the registered version on the logged model (the tag MLflow's UI reads to show
    a logged model's versions; a tracking server sets it itself, SQLite leaves it to us)."""
    current = client.get_logged_model(model.model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    versions = json.loads(current) if current else []
    if not any(v.get("name") == name and str(v.get("version")) == str(version)
               for v in versions):
        versions.append({"name": name, "version": str(version)})
        client.set_logged_model_tags(model.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
