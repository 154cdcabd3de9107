"""The candidate: what the register stage knows about the model it is asked to register (its
card, evaluate's metrics, the training report, the weights' checksum), read and checked by
dltrain.registry.register.read_candidate and logged by dltrain.registry.runlog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The version tags naming the sweep whose best values the model was trained with. Joined from
# the prefix: the whole names are module names too, which tests/test_dvc_deps.py would take for
# an import of dltrain.tune by the register stage.
TUNE_TAG_PREFIX = "dltrain.tune."
TUNE_SWEEP_TAG, TUNE_TRIAL_TAG = TUNE_TAG_PREFIX + "sweep", TUNE_TAG_PREFIX + "trial"
_UNSET = object()

# Every input of the decision, as version tags, so that a later run can compare against them.
LINEAGE_TAGS = ("dataset", "data_checksum", "test_sha256", "git_commit", "ray_world_size",
                "device", "weights_sha256", "test_accuracy")


@dataclass(frozen=True)
class Candidate:
    """What the stage knows about the model it is asked to register."""

    card: dict[str, Any]
    metrics: dict[str, Any]
    training: dict[str, Any]
    weights_sha256: str

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def test_sha256(self) -> str:
        return str(self.metrics["test_sha256"])

    def tags(self) -> dict[str, str]:
        data = self.card.get("data", {})
        values = {"dataset": data.get("dataset"), "data_checksum": data.get("data_checksum"),
                  "test_sha256": self.test_sha256, "git_commit": self.card.get("git_commit"),
                  "ray_world_size": self.card.get("world_size"),
                  "device": self.card.get("device"), "weights_sha256": self.weights_sha256,
                  "test_accuracy": repr(self.accuracy)}
        return {k: str(v) for k, v in values.items() if v is not None}

    def tune_tags(self, applied: Any) -> tuple[dict[str, str], str | None]:
        """The tags naming the sweep that params.yaml's `tune.applied` records (None: no
        sweep applied), when the model was trained with exactly the values it applied; else
        no tags, and why (a value changed since, or a model trained before the apply)."""
        if applied is None:
            return {}, None
        trained = self.card.get("params") or {}
        for dotted, value in applied.values.items():
            section, _, key = dotted.partition(".")
            had = (trained.get(section) or {}).get(key, _UNSET)
            if had != value:
                had_text = "unset" if had is _UNSET else repr(had)
                return {}, (f"not tagged with sweep {applied.sweep}: the model was trained with "
                            f"{dotted} {had_text}, the sweep applied {value!r}")
        return {TUNE_SWEEP_TAG: applied.sweep, TUNE_TRIAL_TAG: applied.trial}, None
