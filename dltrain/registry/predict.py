"""`dltrain predict`: classify PNG images or IDX image files with a model given as a path to
model.safetensors or as `models:/<name>@<alias>` in the MLflow registry.

Models load through dltrain.model.weights only (safetensors, checked against model.json) and run
with numpy, without torch's import time: a pickle-bearing file (a torch model.pt) is refused,
wherever it came from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.data.idx import read_images
from dltrain.errors import DataError, ModelError
from dltrain.model.classes import class_names
from dltrain.paths import PARAMS_FILE, Workspace, card_path_for
from dltrain.tracking.store import parse_model_ref, resolve_tracking_uri

IMAGE_SIZE = (28, 28)


def _looks_like_idx(path: Path) -> bool:
    """IDX (0x00 0x00 0x08 ndim) or gzip (which is how the IDX files ship); PNG starts 0x89."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:2] == b"\x1f\x8b" or (len(head) == 4 and head[:3] == b"\x00\x00\x08")


def read_image(path: Path) -> np.ndarray:
    """Any image Pillow decodes, as 28x28 uint8 grey (converted and resized when needed)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.convert("L")  # decodes the pixels: truncated data fails here
            if grey.size != IMAGE_SIZE:
                grey = grey.resize(IMAGE_SIZE, Image.Resampling.LANCZOS)
            return np.asarray(grey, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode the image ({exc}); expected a PNG "
                        "(or any format Pillow reads) or an IDX images file") from exc


def _read_input(path: Path) -> tuple[list[str], np.ndarray]:
    """The named images of one input: a PNG gives one, an IDX file one per image."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give PNG images or an IDX file "
                        f"(for every PNG in it: {path}/*.png)")
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    if not path.is_file():
        raise DataError(f"{path}: input not found{where}")
    try:
        idx = _looks_like_idx(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it{where}: {exc.strerror or exc}") from exc
    if idx:
        images = read_images(path)
        return [f"{path}[{i}]" for i in range(len(images))], images
    return [str(path)], read_image(path)[None]


def read_inputs(paths: list[Path]) -> tuple[list[str], np.ndarray, list[DataError]]:
    """One (name, image) per image of the inputs that can be read (a PNG gives one, an IDX file
    one per image, named `file.idx[i]`), as (N, 28, 28) uint8; and the error of each input
    that cannot, so that one bad input among many costs only its own results."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    errors: list[DataError] = []
    for path in paths:
        try:
            found, images = _read_input(path)
        except DataError as exc:
            errors.append(exc)
            continue
        names += found
        arrays.append(images)
    return (names, np.concatenate(arrays) if arrays else np.zeros((0, *IMAGE_SIZE), np.uint8),
            errors)


def load_inputs(paths: list[Path]) -> tuple[list[str], np.ndarray]:
    """read_inputs, all or nothing: the first unreadable input's error."""
    names, images, errors = read_inputs(paths)
    if errors:
        raise errors[0]
    return names, images


def predict(state: dict[str, np.ndarray], images: np.ndarray,
            batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class index and its softmax probability for each uint8 image (N, 28, 28),
    through the MLP whose checked weights are `state` (dltrain.model.weights.load_weights): the
    registered MLflow model's own computation (dltrain.registry.mlflow_model), so both agree."""
    from dltrain.model.weights import probabilities

    probs = probabilities(state, images, batch_size)
    index = probs.argmax(axis=1)
    return index, probs[np.arange(len(probs)), index]


def is_workspace(root: Path) -> bool:
    """A dltrain workspace: its pipeline (dvc.yaml) or its params file is there."""
    return (root / "dvc.yaml").is_file() or (root / PARAMS_FILE).is_file()


def _enclosing_workspace(start: Path) -> Path | None:
    """The nearest folder above `start` that is a workspace with a trained model."""
    for folder in start.resolve().parents:
        if is_workspace(folder) and Workspace(folder).model_path.is_file():
            return folder
    return None


def _shown(path: Path, given: str | None, ws: Workspace) -> str:
    """The model path as the user gave it, and the folder a relative one is relative to (None:
    the workspace's default model)."""
    if given is None:
        return f"{path.relative_to(ws.root)} (the default model, in {ws.root})"
    return given if Path(given).is_absolute() else f"{given} (relative to {Path.cwd()})"


def _restore_hint(ws: Workspace) -> str:
    where = "" if ws.root == Path.cwd().resolve() else f" in {ws.root}"
    return (f"restore it from DVC's cache (`dvc checkout models`{where}) or train it "
            f"(`dvc repro train`{where})")


def check_model_path(path: Path, given: str | None, ws: Workspace) -> None:
    """A clear error when the weights or their card are missing: it names the path the user
    gave (`given`; None: the workspace's default model), the folder a relative one is relative
    to, and the fix that fits where it lies: DVC restores only the workspace's own models/."""
    weights, card = path.is_file(), card_path_for(path).is_file()
    if weights and card:
        return
    shown = _shown(path, given, ws)
    inside = path.resolve().parent == ws.models_dir
    if given is None and not is_workspace(ws.root):
        found = _enclosing_workspace(ws.root)
        fix = (f"the workspace above it is {found}: run predict there or pass `-C {found}`"
               if found is not None else
               "run predict in the workspace, or name it with `-C DIR`")
        raise ModelError(f"no model at {shown}: {ws.root} is not a dltrain workspace (no "
                         f"dvc.yaml or {PARAMS_FILE}); {fix}, or pass --model PATH or "
                         "--model models:/mnist-mlp@champion")
    if not weights:
        if path.with_name("model.pt").is_file() and path.suffix == ".safetensors":
            from dltrain.model.weights import not_found_error

            raise not_found_error(path)  # an older dltrain's pickle beside it: says so
        fix = (_restore_hint(ws) if inside and is_workspace(ws.root) else
               "check the path (a weights file written by `dltrain train`, its model.json "
               "beside it), or pass --model models:/<name>@<alias>")
        raise ModelError(f"model file not found: {shown}; {fix}")
    card_shown = _shown(card_path_for(path),
                        None if given is None else str(card_path_for(Path(given))), ws)
    fix = (_restore_hint(ws) if inside and is_workspace(ws.root) else
           "copy the model.json that `dltrain train` wrote beside these weights next to them "
           "(named after the weights file, with .json)")
    raise ModelError(f"{given if given is not None else path} has no model card beside it: "
                     f"{card_shown} is missing; {fix}")


def resolve_model(model: str | None, tracking_uri: str | None,
                  ws: Workspace) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load `model`: a path to model.safetensors (relative to the current directory; None:
    the workspace's models/model.safetensors), or models:/<name>@<alias> in the workspace's
    registry (through the local cache of dltrain.registry.cache: MLflow is imported only when
    the store changed since the alias was last resolved); the checked weights and the card."""
    from dltrain.model.weights import load_weights

    if model is None or (parse_model_ref(model) is None and not model.startswith("models:/")):
        path = ws.model_path if model is None else Path(model)
        check_model_path(path, model, ws)
        return load_weights(path)
    from dltrain.registry.cache import fetch
    from dltrain.tracking.store import sqlite_path

    uri = resolve_tracking_uri(tracking_uri, ws.root)
    db = sqlite_path(uri)
    if tracking_uri is None and db is not None and not db.is_file():
        fix = ("run `dltrain register` first" if is_workspace(ws.root) else
               f"{ws.root} is not a dltrain workspace: run predict in the workspace, or name "
               "it with `-C DIR`")
        raise ModelError(f"{model}: no MLflow registry at {db}; {fix}, or pass --tracking-uri")
    return fetch(model, uri)


def classify(model: dict[str, np.ndarray], card: dict[str, Any],
             inputs: list[Path]) -> tuple[list[dict[str, Any]], list[DataError]]:
    """Per input image that can be read: {"path", "class", "class_name", "probability"}; and
    the error of each input that cannot."""
    names, images, errors = read_inputs(inputs)
    dataset = (card.get("data") or {}).get("dataset")
    labels = class_names(dataset) if dataset else None
    index, prob = predict(model, images)
    return [{"path": name, "class": int(k), "class_name": labels[k] if labels else None,
             "probability": round(float(p), 6)} for name, k, p in zip(names, index, prob,
                                                                         strict=True)], errors


def predict_command(model: str | None, inputs: list[Path], *, as_json: bool,
                    tracking_uri: str | None, workspace: Path | None = None
                    ) -> list[dict[str, Any]]:
    """The CLI's predict: print one line per input image (or a JSON list) and return the
    results. Inputs that cannot be read cost only their own lines: the others are printed,
    then a DataError names the unreadable ones.

    `workspace` (default: the current directory) holds the default model (models/) and the
    embedded registry for models:/ references without a tracking URI, as `dltrain train` and
    `dltrain register` write them. A --model path and the inputs are relative to the current
    directory, as a shell completes them.
    """
    ws = Workspace.at(workspace if workspace is not None else Path.cwd())
    net, card = resolve_model(model, tracking_uri, ws)
    results, errors = classify(net, card, inputs)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            label = f"{r['class']} {r['class_name']}" if r["class_name"] else str(r["class"])
            print(f"{r['path']}: {label} ({r['probability']:.1%})")
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise DataError(f"{len(errors)} of {len(inputs)} inputs could not be read: "
                        + "; ".join(str(e) for e in errors))
    return results
