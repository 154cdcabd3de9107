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
from dltrain.errors import DataError
from dltrain.model.classes import class_names
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


def load_inputs(paths: list[Path]) -> tuple[list[str], np.ndarray]:
    """One (name, image) per input image: a PNG gives one, an IDX file one per image
    (named `file.idx[i]`). Images are (N, 28, 28) uint8."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for path in paths:
        if path.is_dir():
            raise DataError(f"{path}: is a directory; give PNG images or an IDX file "
                            f"(for every PNG in it: {path}/*.png)")
        if not path.is_file():
            raise DataError(f"{path}: input not found")
        if _looks_like_idx(path):
            images = read_images(path)
            names += [f"{path}[{i}]" for i in range(len(images))]
            arrays.append(images)
        else:
            names.append(str(path))
            arrays.append(read_image(path)[None])
    return names, np.concatenate(arrays) if arrays else np.zeros((0, *IMAGE_SIZE), np.uint8)


def predict(state: dict[str, np.ndarray], images: np.ndarray,
            batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class index and its softmax probability for each uint8 image (N, 28, 28),
    through the MLP whose checked weights are `state` (dltrain.model.weights.load_weights): the
    registered MLflow model's own computation (dltrain.registry.mlflow_model), so both agree."""
    from dltrain.model.weights import probabilities

    probs = probabilities(state, images, batch_size)
    index = probs.argmax(axis=1)
    return index, probs[np.arange(len(probs)), index]


def resolve_model(model: str, tracking_uri: str | None,
                  registry_root: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Load `model`: a path to model.safetensors, or models:/<name>@<alias> (through the local
    cache of dltrain.registry.cache: MLflow is imported only when the store changed since the
    alias was last resolved); the checked weights and the card."""
    from dltrain.model.weights import load_weights

    if parse_model_ref(model) is None and not model.startswith("models:/"):
        return load_weights(Path(model))
    from dltrain.registry.cache import fetch

    return fetch(model, resolve_tracking_uri(tracking_uri, registry_root))


def classify(model: dict[str, np.ndarray], card: dict[str, Any],
             inputs: list[Path]) -> list[dict[str, Any]]:
    """Per input image: {"path", "class", "class_name", "probability"}."""
    names, images = load_inputs(inputs)
    dataset = (card.get("data") or {}).get("dataset")
    labels = class_names(dataset) if dataset else None
    index, prob = predict(model, images)
    return [{"path": name, "class": int(k), "class_name": labels[k] if labels else None,
             "probability": round(float(p), 6)} for name, k, p in zip(names, index, prob,
                                                                         strict=True)]


def predict_command(model: str, inputs: list[Path], *, as_json: bool,
                    tracking_uri: str | None) -> list[dict[str, Any]]:
    """The CLI's predict: print one line per input (or a JSON list) and return the results.

    The embedded registry, for models:/ references without a tracking URI, is the one under
    the current directory (the repo), as `dltrain register` writes it.
    """
    net, card = resolve_model(model, tracking_uri, Path.cwd())
    results = classify(net, card, inputs)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            label = f"{r['class']} {r['class_name']}" if r["class_name"] else str(r["class"])
            print(f"{r['path']}: {label} ({r['probability']:.1%})")
    return results
