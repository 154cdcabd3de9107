"""The evaluate stage: metrics against hand-computed oracles, and the reports it writes."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from torch.nn import functional as F

from dltrain.cli import main
from dltrain.errors import DataError, ModelError
from dltrain.evaluate.stage import (
    compute_confusion,
    compute_metrics,
    cross_entropy,
    evaluate,
    matches,
    score_model,
    top_probability,
)
from dltrain.model.classes import FASHION_MNIST, MNIST, class_key
from dltrain.model.mlp import normalize
from dltrain.model.torchio import load_model
from dltrain.paths import Workspace

from helpers.models import make_trained_workspace, write_params

# A tiny fixed prediction set: 6 samples, classes 0..2 (7 classes absent), predictions
# [0, 1, 1, 1, 2, 0] for labels [0, 0, 1, 1, 2, 2].
LABELS = np.array([0, 0, 1, 1, 2, 2])
PREDICTED = np.array([0, 1, 1, 1, 2, 0])


def _logits(predicted: np.ndarray, margin: float = 2.0) -> np.ndarray:
    logits = np.zeros((len(predicted), 10), dtype=np.float32)
    logits[np.arange(len(predicted)), predicted] = margin
    return logits


def test_metrics_match_hand_computed_values() -> None:
    metrics = compute_metrics(LABELS, _logits(PREDICTED), MNIST)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # class 0: predicted 0 twice (one right) -> precision 1/2; actual 0 twice, one found -> 1/2
    # class 1: predicted 1 three times, two right -> 2/3; both actual 1 found -> recall 1
    # class 2: predicted once, right -> 1; one of two actual found -> 1/2
    expected = {"0": (1 / 2, 1 / 2, 2), "1": (2 / 3, 1.0, 2), "2": (1.0, 1 / 2, 2)}
    for name, (precision, recall, support) in expected.items():
        row = metrics["per_class"][name]
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
        assert row["support"] == support
    # Classes with no samples and no predictions score 0, not NaN (zero_division=0).
    assert metrics["per_class"]["9"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Cross-entropy oracle: -log softmax of the true class, averaged.
    right = -math.log(math.exp(2) / (math.exp(2) + 9))
    wrong = -math.log(1 / (math.exp(2) + 9))
    assert metrics["loss"] == pytest.approx((4 * right + 2 * wrong) / 6, rel=1e-5)


def test_class_keys_are_metric_safe_and_distinct() -> None:
    """MLflow metric keys of the per-class figures: [a-z0-9_] only, one per class, in label
    order, readable (Fashion-MNIST's "T-shirt/top" -> class_0_tshirt_top)."""
    fashion = [class_key(i, n) for i, n in enumerate(FASHION_MNIST)]
    assert fashion == ["class_0_tshirt_top", "class_1_trouser", "class_2_pullover",
                       "class_3_dress", "class_4_coat", "class_5_sandal", "class_6_shirt",
                       "class_7_sneaker", "class_8_bag", "class_9_ankle_boot"]
    assert [class_key(i, n) for i, n in enumerate(MNIST)] == [f"class_{i}" for i in range(10)]
    assert class_key(3, "Odd / name -- here!") == "class_3_odd_name_here"
    assert class_key(4, "///") == "class_4"


def test_a_recorded_checksum_matches_in_full_or_by_its_first_12_digits() -> None:
    sha = "0123456789abcdef" * 4
    assert matches(sha, sha) and matches(sha[:12], sha)
    assert not matches(sha[:11], sha)  # too short to tell weights apart
    assert not matches("f" * 12, sha) and not matches(None, sha)


def test_confusion_rows_are_actual_and_columns_predicted() -> None:
    matrix = compute_confusion(LABELS, PREDICTED)
    assert matrix.shape == (10, 10)
    assert matrix[0, 0] == 1 and matrix[0, 1] == 1   # one 0 right, one 0 called 1
    assert matrix[1, 1] == 2
    assert matrix[2, 2] == 1 and matrix[2, 0] == 1   # one 2 called 0
    assert matrix.sum() == len(LABELS)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=300))
def test_metrics_are_scikit_learns(pairs: list[tuple[int, int]]) -> None:
    """The numpy formulas give exactly scikit-learn's figures (zero_division=0), whatever the
    mix of present, absent, never-predicted classes."""
    labels, predicted = (np.array(column) for column in zip(*pairs, strict=True))
    metrics = compute_metrics(labels, _logits(predicted), MNIST)
    classes = list(range(10))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["macro_f1"] == pytest.approx(float(np.mean(f1)))
    for k in classes:
        row = metrics["per_class"][MNIST[k]]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(
            (precision[k], recall[k], f1[k]))
        assert row["support"] == support[k]
    assert (compute_confusion(labels, predicted)
            == confusion_matrix(labels, predicted, labels=classes)).all()


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3], ids=["small", "large", "huge"])
def test_cross_entropy_and_confidence_are_torchs(scale: float) -> None:
    """torch's F.cross_entropy and softmax, also where a naive exp would overflow."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((257, 10)) * scale).astype(np.float32)
    labels = rng.integers(0, 10, 257)
    as_double = torch.from_numpy(logits).double()
    expected = F.cross_entropy(as_double, torch.from_numpy(labels)).item()
    assert cross_entropy(logits, labels) == pytest.approx(expected, rel=1e-12)
    assert cross_entropy(logits, labels) == pytest.approx(
        F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item(), rel=1e-5)
    np.testing.assert_allclose(top_probability(logits),
                               torch.softmax(as_double, dim=1).max(dim=1).values.numpy(),
                               rtol=1e-12)


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_trained_workspace(tmp_path_factory.mktemp("evaluate"))


def _evaluate(ws: Workspace) -> dict:
    return evaluate(ws.model_path, ws.processed_dir, ws.reports_dir, batch_size=64)


def test_evaluate_writes_metrics_plots_and_csv(trained_ws: Workspace) -> None:
    returned = _evaluate(trained_ws)
    metrics = json.loads(trained_ws.metrics_path.read_text())
    # metrics.json: the headline figures only (`dvc metrics show` fits 100 columns), and short
    # checksums of what was measured (register refuses metrics of other weights or data).
    assert set(metrics) == {"accuracy", "loss", "macro_f1", "n", "test_sha256", "weights_sha256"}
    assert {k: metrics[k] for k in ("accuracy", "loss", "macro_f1", "n")} == {
        k: returned[k] for k in ("accuracy", "loss", "macro_f1", "n")}
    summary = json.loads((trained_ws.processed_dir / "summary.json").read_text())
    assert metrics["accuracy"] >= 0.9 and 0 < metrics["loss"] < 1.0
    assert metrics["n"] == summary["test"]["n"] == 200
    assert metrics["test_sha256"] == summary["test"]["sha256"][:12] == returned["test_sha256"][:12]
    card = json.loads(trained_ws.model_card_path.read_text())
    assert metrics["weights_sha256"] == card["weights_sha256"][:12]
    # per_class.json: every class in label order, its display name (from summary's dataset),
    # a metric-safe key, the figures; and the full checksums.
    per_class = json.loads((trained_ws.reports_dir / "per_class.json").read_text())
    assert (per_class["test_sha256"], per_class["weights_sha256"]) == (
        summary["test"]["sha256"], card["weights_sha256"])
    assert [row["class"] for row in per_class["classes"]] == list(FASHION_MNIST)
    assert [row["index"] for row in per_class["classes"]] == list(range(10))
    for row in per_class["classes"]:
        assert {k: row[k] for k in ("precision", "recall", "f1", "support")} == \
            returned["per_class"][row["class"]]
    assert per_class["classes"][0]["key"] == "class_0_tshirt_top"

    with open(trained_ws.reports_dir / "confusion.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 200
    labels = np.load(trained_ws.processed_dir / "test_labels.npy")
    assert [r["actual"] for r in rows] == [FASHION_MNIST[k] for k in labels]
    agree = sum(r["actual"] == r["predicted"] for r in rows)
    assert agree / len(rows) == pytest.approx(metrics["accuracy"])

    for name in ("confusion_matrix.png", "misclassified.png", "training_curves.png"):
        with Image.open(trained_ws.reports_dir / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 300


def test_training_curves_are_drawn_from_training_json(trained_ws: Workspace) -> None:
    """reports/training_curves.png: loss and accuracy curves that show offline (`dvc plots
    show` draws its own with Vega from a CDN). Read back: a picture, not a blank canvas."""
    from matplotlib.image import imread

    _evaluate(trained_ws)
    pixels = imread(trained_ws.reports_dir / "training_curves.png")[..., :3]
    non_white = (pixels < 0.9).any(axis=-1).mean()
    assert 0.02 < non_white < 0.5, non_white  # axes, ticks, labels and four curves
    # Coloured pixels: the curves themselves (the axes and the text are black or grey).
    colour = pixels.max(axis=-1) - pixels.min(axis=-1)
    assert (colour > 0.3).mean() > 0.001
    assert pixels.std() > 0.05


def test_without_training_json_the_curves_are_left_out(trained_ws: Workspace, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(trained_ws.root, ws.root, dirs_exist_ok=True)
    _evaluate(ws)
    ws.training_report_path.unlink()
    assert (ws.reports_dir / "training_curves.png").exists()  # of training.json, until now
    _evaluate(ws)
    assert "no training curves" in capsys.readouterr().out
    assert not (ws.reports_dir / "training_curves.png").exists()
    assert ws.metrics_path.is_file()


def test_metrics_are_the_torch_models(trained_ws: Workspace) -> None:
    """The numpy forward pass scores the model as torch does: same predictions, same loss."""
    metrics = _evaluate(trained_ws)
    images = np.load(trained_ws.processed_dir / "test_images.npy")
    labels = torch.from_numpy(np.load(trained_ws.processed_dir / "test_labels.npy")).long()
    model, _ = load_model(trained_ws.model_path)
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(images)))
    assert metrics["accuracy"] == (logits.argmax(1) == labels).double().mean().item()
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_score_model_is_evaluate_without_the_reports(trained_ws: Workspace,
                                                    tmp_path: Path) -> None:
    """The register stage re-scores a champion with score_model: the same figures as evaluate."""
    metrics = _evaluate(trained_ws)
    assert score_model(trained_ws.model_path, trained_ws.processed_dir, batch_size=64) == metrics


def test_cli_evaluate_exits_zero(trained_ws: Workspace, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--workspace", str(trained_ws.root)]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_missing_model_is_a_clear_error(tmp_path: Path, trained_ws: Workspace,
                                        capsys: pytest.CaptureFixture) -> None:
    ws = Workspace.at(tmp_path)
    write_params(ws.root)
    shutil.copytree(trained_ws.processed_dir, ws.processed_dir)
    with pytest.raises(ModelError, match="model description not found"):
        _evaluate(ws)
    assert main(["evaluate", "--workspace", str(ws.root)]) == 1
    assert "models/model.json" in capsys.readouterr().err
    assert not ws.metrics_path.exists()


def test_missing_test_split_is_a_data_error(tmp_path: Path, trained_ws: Workspace) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(trained_ws.models_dir, ws.models_dir)
    with pytest.raises(DataError, match="run `dltrain preprocess` first"):
        _evaluate(ws)
    assert not ws.reports_dir.exists()


def test_shape_mismatch_with_model_json_is_refused(tmp_path: Path, trained_ws: Workspace,
                                                   capsys: pytest.CaptureFixture) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(trained_ws.root, ws.root, dirs_exist_ok=True)
    ws.metrics_path.unlink(missing_ok=True)
    card = json.loads(ws.model_card_path.read_text())
    card["architecture"]["hidden_sizes"] = [64]
    ws.model_card_path.write_text(json.dumps(card))
    assert main(["evaluate", "--workspace", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert "does not match the architecture" in err and "[64]" in err
    assert not ws.metrics_path.exists()


def test_corrupt_model_file_is_refused(tmp_path: Path, trained_ws: Workspace) -> None:
    ws = Workspace.at(tmp_path)
    shutil.copytree(trained_ws.root, ws.root, dirs_exist_ok=True)
    ws.model_path.write_bytes(ws.model_path.read_bytes()[:100])
    with pytest.raises(ModelError, match="corrupt"):
        _evaluate(ws)
