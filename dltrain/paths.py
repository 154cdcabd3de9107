"""Where each stage reads and writes, relative to one workspace root (the repo, by default).

The names are the stage contract of DESIGN.md; stage functions take these paths as
arguments, so nothing below the CLI reads the current directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The Prefect flow run a stage runs in: the flow sets it in the stage's environment, and the
# registry records it with each alias move.
FLOW_RUN_ID_ENV = "DLTRAIN_FLOW_RUN_ID"
TRAINING_CURVES_PNG = "training_curves.png"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def at(cls, root: Path | str) -> Workspace:
        return cls(Path(root).resolve())

    @property
    def params_path(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

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
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def model_path(self) -> Path:
        return self.models_dir / "model.safetensors"

    @property
    def model_card_path(self) -> Path:
        return self.models_dir / "model.json"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def training_report_path(self) -> Path:
        return self.reports_dir / "training.json"

    @property
    def training_curves_path(self) -> Path:
        return self.reports_dir / TRAINING_CURVES_PNG

    @property
    def metrics_path(self) -> Path:
        return self.reports_dir / "metrics.json"

    @property
    def registration_path(self) -> Path:
        return self.reports_dir / "registration.json"

    @property
    def ray_results_dir(self) -> Path:
        return self.root / ".ray_results"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlruns"
