"""The evaluate stage: test-set metrics of models/model.safetensors, for DVC metrics and plots.

The classification metrics are read off the confusion matrix with numpy (scikit-learn's
definitions, zero_division=0; tests/test_evaluate.py checks them against scikit-learn on random
input): importing sklearn.metrics would cost this stage a second of its ~4 s.

No torch either: `import torch` was half of this stage's time (1.4 of 2.9 s), for a forward
pass that numpy does as fast. The weights are read by dltrain.model.weights (the same checks as
dltrain.model.torchio.load_model: safetensors, the card's pair, every shape), the forward pass
is its numpy twin of dltrain.model.mlp.MLP, and the cross-entropy is computed here with the same
definition as torch's F.cross_entropy (mean of -log softmax at the true class; tests check both
against torch).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.atomic import atomic_open, read_json, write_json
from dltrain.errors import DataError
from dltrain.model.classes import class_key, class_names
from dltrain.model.weights import NUM_CLASSES, load_weights_and_digest, mlp_logits
from dltrain.paths import TRAINING_CURVES_PNG

METRICS_FILE = "metrics.json"
PER_CLASS_FILE = "per_class.json"
CONFUSION_CSV = "confusion.csv"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
CURVES_PNG = TRAINING_CURVES_PNG
TRAINING_REPORT = "training.json"  # the train stage's, in the same reports directory
# metrics.json's checksums are this many hex digits (as git shortens a commit's): enough to
# tell which weights and test split were measured, short enough that `dvc metrics show` fits
# a 100-column terminal. per_class.json carries them in full.
SHORT_SHA = 12
HEADLINE = ("accuracy", "loss", "macro_f1", "n")


def load_test_split(processed_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The test images (N, 28, 28) uint8, labels (N,) and data/processed/summary.json.

    The bytes parsed are the bytes hashed: a split changed since preprocess wrote it (its
    sha256 is in summary.json) is refused, so no figure is ever stamped with the checksum of a
    split it was not measured on. evaluate and the register stage's re-score both read here."""
    processed_dir = Path(processed_dir)
    paths = [processed_dir / n for n in ("test_images.npy", "test_labels.npy", "summary.json")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"processed data missing: {', '.join(missing)} "
                        "(run `dltrain preprocess` first)")
    try:
        payloads = [paths[0].read_bytes(), paths[1].read_bytes()]
        # allow_pickle=False: a .npy holding objects would run code when loaded.
        images = np.load(io.BytesIO(payloads[0]), allow_pickle=False)
        labels = np.load(io.BytesIO(payloads[1]), allow_pickle=False)
        summary = read_json(paths[2])
    except ValueError as exc:
        raise DataError(f"{processed_dir}: unreadable processed test split: {exc}") from exc
    recorded = (summary.get("test") or {}).get("sha256") if isinstance(summary, dict) else None
    if recorded:
        read = hashlib.sha256(payloads[0] + payloads[1]).hexdigest()
        if read != recorded:
            raise DataError(f"{paths[0]} / {paths[1].name} are not the test split preprocess "
                            f"wrote (sha256 {read[:12]}, {paths[2].name} records "
                            f"{str(recorded)[:12]}): it was changed since; re-run "
                            "`dvc repro preprocess` (or `dltrain preprocess`)")
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(f"{processed_dir}: test images {images.shape} and labels {labels.shape} "
                        "do not match (expected (N, 28, 28) and (N,)); re-run preprocess")
    if labels.size == 0:
        raise DataError(f"{processed_dir}: the test split is empty")
    if labels.dtype.kind not in "ui" or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{paths[1]}: labels must be integers in 0..{NUM_CLASSES - 1}, found "
                        f"{labels.dtype} from {labels.min()} to {labels.max()}; re-run "
                        "`dvc repro preprocess`")
    return images, labels, summary


def split_checksum(processed_dir: Path, summary: dict[str, Any]) -> str:
    """The test split's sha256 as preprocess recorded it (else computed from the arrays), the key
    that says whether two models were evaluated on the same data."""
    recorded = (summary.get("test") or {}).get("sha256")
    if recorded:
        return str(recorded)
    digest = hashlib.sha256()
    for name in ("test_images.npy", "test_labels.npy"):
        digest.update((Path(processed_dir) / name).read_bytes())
    return digest.hexdigest()


def _log_sum_exp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) per row, in float64, shifted by the row's maximum so that no exp
    overflows."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy (natural log) of logits against integer labels: torch's
    F.cross_entropy(logits, labels), computed stably in float64."""
    z = np.asarray(logits, dtype=np.float64)
    true = z[np.arange(len(z)), np.asarray(labels, dtype=np.int64)]
    return float(np.mean(_log_sum_exp(z) - true))


def top_probability(logits: np.ndarray) -> np.ndarray:
    """The largest softmax probability of each row: how confident each prediction is."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(z.max(axis=1) - _log_sum_exp(z))


def compute_metrics(labels: np.ndarray, logits: np.ndarray,
                    names: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, macro F1 and per-class precision/recall/F1/support."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(logits).argmax(axis=1)
    matrix = compute_confusion(labels, predictions).astype(np.float64)
    right = np.diag(matrix)
    support = matrix.sum(axis=1)
    precision = _ratio(right, matrix.sum(axis=0))
    recall = _ratio(right, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    loss = cross_entropy(logits, labels)
    per_class = {
        names[k]: {"precision": float(precision[k]), "recall": float(recall[k]),
                   "f1": float(f1[k]), "support": int(support[k])}
        for k in range(NUM_CLASSES)
    }
    return {"accuracy": float(right.sum() / len(labels)), "loss": float(loss),
            "macro_f1": float(np.mean(f1)), "per_class": per_class}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (a class never predicted or never
    present scores 0, not NaN: scikit-learn's zero_division=0)."""
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def compute_confusion(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Confusion counts (10, 10): row = actual class, column = predicted class."""
    pairs = np.asarray(labels, dtype=np.int64) * NUM_CLASSES + np.asarray(predictions)
    return np.bincount(pairs, minlength=NUM_CLASSES * NUM_CLASSES).reshape(
        NUM_CLASSES, NUM_CLASSES)


def write_confusion_csv(path: Path, labels: np.ndarray, predictions: np.ndarray,
                        names: tuple[str, ...]) -> None:
    """One `actual,predicted` row per test image: the input of DVC's confusion template."""
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["actual", "predicted"])
        writer.writerows((names[a], names[p]) for a, p in zip(labels, predictions, strict=True))


def score_model(model_path: Path, processed_dir: Path, *, batch_size: int) -> dict[str, Any]:
    """The test metrics of the model at `model_path` on the test split in `processed_dir`, with
    the two checksums that say what was measured: `weights_sha256` (the bytes read) and
    `test_sha256` (the split). The register stage re-scores a champion with this same function
    when the test data changed, so both models are measured by one definition."""
    metrics, _images, _labels, _logits = _measure(model_path, processed_dir, batch_size)
    return metrics


def _measure(model_path: Path, processed_dir: Path, batch_size: int
             ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    weights, card, weights_sha256 = load_weights_and_digest(model_path)
    images, labels, summary = load_test_split(processed_dir)
    dataset = summary.get("dataset") or (card.get("data") or {}).get("dataset")
    logits = mlp_logits(weights, images, batch_size)
    metrics = {**compute_metrics(labels, logits, class_names(dataset)), "n": int(len(labels)),
               "dataset": dataset, "test_sha256": split_checksum(processed_dir, summary),
               "weights_sha256": weights_sha256}
    return metrics, images, labels, logits


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """What reports/metrics.json holds: the figures `dvc metrics show` and `diff` compare, and
    the short checksums of what was measured (the register stage checks them)."""
    return {**{key: metrics[key] for key in HEADLINE},
            "test_sha256": metrics["test_sha256"][:SHORT_SHA],
            "weights_sha256": metrics["weights_sha256"][:SHORT_SHA]}


def per_class_report(metrics: dict[str, Any]) -> dict[str, Any]:
    """What reports/per_class.json holds: one row per class, in label order, with its display
    name and its metric-safe key (dltrain.model.classes.class_key), for `dvc plots` and the register
    stage; and the full checksums of what was measured."""
    rows = [{"index": index, "class": name, "key": class_key(index, name), **figures}
            for index, (name, figures) in enumerate(metrics["per_class"].items())]
    return {"dataset": metrics["dataset"], "test_sha256": metrics["test_sha256"],
            "weights_sha256": metrics["weights_sha256"], "classes": rows}


def matches(recorded: Any, sha256: str) -> bool:
    """True if `recorded` (a checksum in metrics.json: full, or its first SHORT_SHA digits)
    is `sha256`."""
    return isinstance(recorded, str) and len(recorded) >= SHORT_SHA and sha256.startswith(recorded)


def evaluate(model_path: Path, processed_dir: Path, reports_dir: Path, *,
             batch_size: int) -> dict[str, Any]:
    """Evaluate the model on the test split; write metrics.json (the headline figures),
    per_class.json, the confusion matrix (CSV for `dvc plots`, PNG), a grid of misclassified
    images and the training curves (from training.json in `reports_dir`, when the train stage
    wrote one) into `reports_dir`; return the metrics with the per-class figures.

    metrics.json carries the sha256 of the weights and of the test split it measured, so that
    the register stage can refuse metrics of another model or data (a skipped evaluate)."""
    # Imported here, not at the top: matplotlib costs 0.5 s, and the register stage imports
    # this module only to re-score a champion.
    from dltrain.evaluate.plots import (
        plot_confusion_matrix,
        plot_misclassified,
        plot_training_curves,
    )

    metrics, images, labels, logits = _measure(model_path, processed_dir, batch_size)
    names = class_names(metrics["dataset"])
    predictions = logits.argmax(axis=1)

    reports_dir = Path(reports_dir)
    write_confusion_csv(reports_dir / CONFUSION_CSV, labels, predictions, names)
    plot_confusion_matrix(compute_confusion(labels, predictions), names,
                          reports_dir / CONFUSION_PNG)
    plot_misclassified(images, labels, predictions, top_probability(logits), names,
                       reports_dir / MISCLASSIFIED_PNG)
    epochs = _training_epochs(reports_dir / TRAINING_REPORT)
    if epochs:
        plot_training_curves(epochs, reports_dir / CURVES_PNG)
    else:  # never leave the curves of another model beside these reports
        (reports_dir / CURVES_PNG).unlink(missing_ok=True)
        print(f"evaluate: no epochs in {reports_dir / TRAINING_REPORT}: no training curves")
    write_json(reports_dir / PER_CLASS_FILE, per_class_report(metrics))
    # metrics.json last: its presence means every report of this run is complete.
    write_json(reports_dir / METRICS_FILE, headline(metrics))
    print(f"evaluate: test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f} "
          f"on {metrics['n']} images -> {reports_dir / METRICS_FILE}")
    return metrics


def _training_epochs(path: Path) -> list[dict[str, Any]]:
    """The per-epoch records of the train stage's report; none when there is no readable one
    (a model trained elsewhere): the curves are then left out, not the evaluation."""
    try:
        epochs = read_json(path).get("epochs") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return []
    return [e for e in epochs or [] if isinstance(e, dict) and "epoch" in e]
