"""The stage contract: every file a stage reads or writes, named here and nowhere else.

`Workspace` places the pipeline's directories under one root (the repo, by default);
`RawFiles`, `ProcessedFiles`, `ModelFiles` and `ReportFiles` name the files inside one such
directory, for the stage functions that are handed the directory as an argument. Stage
functions take paths as arguments, so nothing below the CLI reads the current directory.
dvc.yaml's outs spell the same paths: tests/test_dvc_deps.py checks that they agree.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The Prefect flow run a stage runs in: the flow sets it in the stage's environment, and the
# registry records it with each alias move.
FLOW_RUN_ID_ENV = "DLTRAIN_FLOW_RUN_ID"

# DVC sets both in a stage command's environment. DVC_EXP_NAME only inside an experiment
# (`dvc exp run`): its name. DVC_ROOT: the repository the stage belongs to; for an experiment
# that runs in a temporary copy (`--temp`, `--queue`), the repository it came from.
DVC_EXPERIMENT_ENV = "DVC_EXP_NAME"
DVC_ROOT_ENV = "DVC_ROOT"


def dvc_experiment(environ: Mapping[str, str] = os.environ) -> str | None:
    """The name of the DVC experiment this stage runs in; None outside one."""
    return environ.get(DVC_EXPERIMENT_ENV) or None


def experiment_origin(root: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """The workspace that `root` stands for: `root` itself, except inside a DVC experiment that
    runs in a copy of the repository, where it is the same place in the repository the
    experiment came from (DVC_ROOT). What outlives the run (the embedded MLflow store) belongs
    there: DVC deletes the copy when the experiment ends."""
    origin = environ.get(DVC_ROOT_ENV)
    if not dvc_experiment(environ) or not origin:
        return Path(root)
    here = Path(root).resolve()
    copy = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), None)
    return Path(root) if copy is None else Path(origin).resolve() / here.relative_to(copy)

PARAMS_FILE = "params.yaml"
# A sweep's directory under the run storage (train.storage_path, like training runs):
# dltrain-tune-<key of the space and the data>; Ray Tune keeps the sweep's state there, so an
# interrupted sweep resumes from it (dltrain.tune.sweep).
TUNE_RUN_PREFIX = "dltrain-tune"
RAW_MANIFEST = "manifest.json"  # beside the data set's files: source, sha256, bytes
PROCESSED_SUMMARY = "summary.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CARD = "model.json"


def card_path_for(model_path: Path | str) -> Path:
    """A weights file's card: the same name with .json (models/model.safetensors ->
    models/model.json), wherever the pair lies (a checkpoint, predict's cache, an MLflow
    model's artifacts)."""
    return Path(model_path).with_suffix(".json")


@dataclass(frozen=True)
class RawFiles:
    """data/raw: the data set's four files (named per data set by dltrain.data.datasets) and the
    manifest the download stage writes last."""

    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / RAW_MANIFEST


@dataclass(frozen=True)
class ProcessedFiles:
    """data/processed: per split, an images and a labels .npy file; and summary.json."""

    dir: Path

    @property
    def summary(self) -> Path:
        return self.dir / PROCESSED_SUMMARY

    def split(self, split: str) -> tuple[Path, Path]:
        """The images and labels .npy files of `split` ('train', 'val' or 'test')."""
        return self.dir / f"{split}_images.npy", self.dir / f"{split}_labels.npy"


@dataclass(frozen=True)
class ModelFiles:
    """A model: its weights (safetensors) and their card, side by side."""

    dir: Path

    @property
    def weights(self) -> Path:
        return self.dir / MODEL_WEIGHTS

    @property
    def card(self) -> Path:
        return card_path_for(self.weights)


@dataclass(frozen=True)
class ReportFiles:
    """reports/: the train stage's training.json, the evaluate stage's metrics and plots, the
    register stage's registration.json."""

    dir: Path

    @property
    def training(self) -> Path:
        return self.dir / "training.json"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def per_class(self) -> Path:
        return self.dir / "per_class.json"

    @property
    def confusion_csv(self) -> Path:
        return self.dir / "confusion.csv"

    @property
    def confusion_png(self) -> Path:
        return self.dir / "confusion_matrix.png"

    @property
    def misclassified_png(self) -> Path:
        return self.dir / "misclassified.png"

    @property
    def curves_png(self) -> Path:
        return self.dir / "training_curves.png"

    @property
    def registration(self) -> Path:
        return self.dir / "registration.json"

    @property
    def tune(self) -> Path:
        """`dltrain tune`'s result: every trial of the latest sweep and the best config."""
        return self.dir / "tune.json"


def split_paths(processed_dir: Path | str, split: str) -> tuple[Path, Path]:
    """The images and labels .npy files of `split` ('train', 'val' or 'test')."""
    return ProcessedFiles(Path(processed_dir)).split(split)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: Path | str) -> Workspace:
        return cls(Path(root).resolve())

    @property
    def params_path(self) -> Path:
        return self.root / PARAMS_FILE

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def raw(self) -> RawFiles:
        return RawFiles(self.raw_dir)

    @property
    def raw_manifest_path(self) -> Path:
        return self.raw.manifest

    @property
    def source_fingerprint_path(self) -> Path:
        """The freshness check's output: the data source's fingerprint
        (dltrain/data/freshness.py)."""
        return self.root / "data" / "source.json"

    @property
    def source_stat_cache_path(self) -> Path:
        """The check's stat cache (size, mtime -> sha256 of a local source's files): beside
        DVC's own temporary state, git-ignored, never a DVC dependency."""
        return self.root / ".dvc" / "tmp" / "dltrain-source-stat.json"

    @property
    def processed_dir(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def processed(self) -> ProcessedFiles:
        return ProcessedFiles(self.processed_dir)

    @property
    def summary_path(self) -> Path:
        return self.processed.summary

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def model_path(self) -> Path:
        return ModelFiles(self.models_dir).weights

    @property
    def model_card_path(self) -> Path:
        return ModelFiles(self.models_dir).card

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def reports(self) -> ReportFiles:
        return ReportFiles(self.reports_dir)

    @property
    def training_report_path(self) -> Path:
        return self.reports.training

    @property
    def metrics_path(self) -> Path:
        return self.reports.metrics

    @property
    def registration_path(self) -> Path:
        return self.reports.registration

    @property
    def tune_report_path(self) -> Path:
        return self.reports.tune

    @property
    def register_log_path(self) -> Path:
        """What MLflow logs while the register stage runs (its errors' tracebacks): kept off
        the console, which gets the stage's one line naming this file. Git-ignored."""
        return self.reports_dir / "register.log"

    @property
    def ray_results_dir(self) -> Path:
        return self.root / ".ray_results"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlruns"
