"""Fetching a registered version's files and checking them: the one way that `dltrain predict`
(models:/ references), `dltrain registry rollback` and the gate's re-score of the champion
(dltrain.registry.register) read a version from the registry.

Three checks, in order, each named in the error when it fails:
- download: the version's files can be fetched from the artifact store;
- weights file: they are plain safetensors weights of the architecture their card describes,
  and the card's weights_sha256 is theirs (dltrain.model.weights, as for any model file);
- registry checksum: their sha256 is the version's `weights_sha256` tag in the registry.

The last one is what makes the registry, not the artifact store, the reference: the files and
the card travel together (a shared folder, a bucket), and whoever can write one can rewrite the
other to match; the tag was written by the registration, into the tracking database.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dltrain.errors import ModelError
from dltrain.registry.mlflow_model import WEIGHTS_SHA256_TAG, weights_in

DOWNLOAD, WEIGHTS_FILE, REGISTRY_CHECKSUM = "download", "weights file", "registry checksum"


@dataclass(frozen=True)
class CheckedVersion:
    """A version's weights, fetched into a folder of the caller's and checked."""

    number: int
    weights: Path
    state: dict[str, np.ndarray]
    card: dict[str, Any]
    weights_sha256: str


class VersionCheckError(ModelError):
    """A version's files failed one of the checks; `check` names it."""

    def __init__(self, name: str, number: int | str, check: str, detail: str) -> None:
        self.check = check
        super().__init__(f"{name} version {number}: the {check} check failed: "
                         f"{' '.join(detail.split())}")


def fetch_checked(version: Any, tracking_uri: str, dst: Path) -> CheckedVersion:
    """Download MLflow model version `version` (a ModelVersion, with its tags) into `dst` and
    check it; VersionCheckError naming the check that failed. Other errors of the store (a
    server that answers 503) propagate, for the caller to report as the store's."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from dltrain.model.weights import load_weights_and_digest

    name, number = version.name, int(version.version)
    try:
        folder = download_artifacts(artifact_uri=version.source, dst_path=str(dst),
                                    tracking_uri=tracking_uri)
    except OSError as exc:
        raise VersionCheckError(name, number, DOWNLOAD,
                                f"its files cannot be read from {version.source} "
                                f"({exc.strerror or exc})") from exc
    except MlflowException as exc:
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise VersionCheckError(name, number, DOWNLOAD,
                                f"its files are not in the artifact store at {version.source} "
                                f"({exc.message})") from exc
    weights = weights_in(Path(folder))
    try:
        state, card, digest = load_weights_and_digest(weights)
    except ModelError as exc:
        raise VersionCheckError(name, number, WEIGHTS_FILE, str(exc)) from exc
    recorded = (version.tags or {}).get(WEIGHTS_SHA256_TAG)
    if not recorded:
        raise VersionCheckError(name, number, REGISTRY_CHECKSUM,
                                f"the version has no {WEIGHTS_SHA256_TAG} tag in the registry "
                                "to check its weights against")
    if digest != recorded:
        raise VersionCheckError(
            name, number, REGISTRY_CHECKSUM,
            f"its weights in the artifact store have sha256 {digest[:12]}, but the registry "
            f"recorded {recorded[:12]} (tag {WEIGHTS_SHA256_TAG}) when it was registered: the "
            f"stored files were replaced; restore them from a backup of {version.source}")
    return CheckedVersion(number, weights, state, card, digest)
