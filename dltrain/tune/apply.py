"""Placeholder for tune-extras' dltrain.tune.apply (same signature; their module replaces this
file): write a sweep's best config into params.yaml."""

from __future__ import annotations

from pathlib import Path

from dltrain.errors import ConfigError


def apply_best(params_path: Path, report: dict) -> list[str]:
    """Write report["best"]["config"] into params.yaml; one line per changed key."""
    raise ConfigError("applying a sweep's winner is not available in this build "
                      f"(dltrain.tune.apply); edit {params_path} by hand")
