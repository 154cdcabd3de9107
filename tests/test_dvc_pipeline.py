"""The data stages through real DVC in a fresh clone: `dvc repro download preprocess` builds
data/raw and data/processed, and a second repro finds nothing to do."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml

from dltrain.io import read_json

from conftest import venv_env, write_raw_dir

pytestmark = pytest.mark.integration

DATA_STAGES = ["download", "preprocess"]  # by name: other stages of dvc.yaml are not ours


def repro(clone: Path, *stages: str) -> str:
    proc = subprocess.run(["dvc", "repro", *stages], cwd=clone, env=venv_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_dvc_repro_runs_the_data_stages_then_finds_them_up_to_date(fresh_clone: Path,
                                                                   tmp_path: Path):
    source = write_raw_dir(tmp_path / "mirror", n_train=300, n_test=100)
    params_path = fresh_clone / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["data"]["source"] = source.as_uri()
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    first = repro(fresh_clone, *DATA_STAGES)
    assert "Running stage 'download'" in first and "Running stage 'preprocess'" in first
    raw, processed = fresh_clone / "data" / "raw", fresh_clone / "data" / "processed"
    manifest = read_json(raw / "manifest.json")
    assert manifest["source"] == source.as_uri()
    summary = read_json(processed / "summary.json")
    assert summary["dataset"] == params["data"]["dataset"]
    assert summary["data_checksum"] == manifest["checksum"]
    assert summary["train"]["n"] + summary["val"]["n"] == 300
    assert summary["test"]["n"] == 100
    lock = yaml.safe_load((fresh_clone / "dvc.lock").read_text())
    assert set(DATA_STAGES) <= set(lock["stages"])
    before = {"raw": digests(raw), "processed": digests(processed)}

    second = repro(fresh_clone, *DATA_STAGES)
    assert "Running stage" not in second
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second
    assert {"raw": digests(raw), "processed": digests(processed)} == before
    # No staging directory was left beside the outputs.
    assert sorted(p.name for p in (fresh_clone / "data").iterdir()
                  if not p.name.startswith(".gitignore")) == ["processed", "raw"]
