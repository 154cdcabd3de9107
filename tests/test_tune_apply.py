"""Applying a sweep's winner to params.yaml (dltrain.tune.apply): a round-trip edit that changes
the tuned values and records the sweep, nothing else; refusals leave the file as it was."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest
import yaml

from dltrain.config import load_params
from dltrain.errors import ConfigError
from dltrain.tune.apply import TuneReportError, apply_best, load_report

from helpers.repo import REPO_ROOT

BEST = {"train.learning_rate": 0.0031622776601683794, "train.batch_size": 64,
        "model.hidden_sizes": [512, 256], "train.ema_decay": 1e-05}


def report(config: dict | None = None, trial: str = "t_00003", sweep: str = "4b1d9e") -> dict:
    return {"sweep": {"name": "tune-1", "mlflow_run_id": sweep},
            "trials": [{"trial_id": trial, "config": config or BEST}],
            "best": {"trial_id": trial, "config": config or BEST, "val_accuracy": 0.9}}


@pytest.fixture
def params_path(tmp_path: Path) -> Path:
    """The repository's own params.yaml (its comments, `null`s and `[512]`), in tmp_path."""
    path = tmp_path / "params.yaml"
    path.write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    return path


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    """The lines a diff removes and adds."""
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0))
    return ([d[1:] for d in diff if d.startswith("-") and not d.startswith("---")],
            [d[1:] for d in diff if d.startswith("+") and not d.startswith("+++")])


def test_only_the_tuned_values_and_the_record_change(params_path: Path):
    before = params_path.read_text()
    params_path.chmod(0o640)
    lines = apply_best(params_path, report())
    after = params_path.read_text()
    assert lines == ["train.learning_rate: 0.001 -> 0.00316", "train.batch_size: 128 -> 64",
                     "model.hidden_sizes: [512] -> [512, 256]", "train.ema_decay: 0.99 -> 1e-05"]
    removed, added = changed_lines(before, after)
    assert removed == [
        "  hidden_sizes: [512]      # the seed's 784-512-10",
        "  batch_size: 128          # global batch, split evenly across workers",
        "  learning_rate: 0.001",
        "  ema_decay: 0.99          # validate and ship a moving average of the weights; 0 = off",
        "  applied: null"]
    # The flow list stays a flow list, each inline comment stays in its column.
    assert added[:4] == [
        "  hidden_sizes: [512, 256] # the seed's 784-512-10",
        "  batch_size: 64           # global batch, split evenly across workers",
        "  learning_rate: 0.0031622776601683794",
        "  ema_decay: 1.0e-05       # validate and ship a moving average of the weights; 0 = off"]
    assert added[4:] == ["  applied:", "    sweep: 4b1d9e", "    trial: t_00003", "    values:",
                         "      train.learning_rate: 0.0031622776601683794",
                         "      train.batch_size: 64", "      model.hidden_sizes: [512, 256]",
                         "      train.ema_decay: 1.0e-05"]
    # The nulls, the comments and the header are all still there, byte for byte.
    assert after.count(": null") == before.count(": null") - 1
    assert after.startswith(before.split("data:")[0])
    assert os.stat(params_path).st_mode & 0o777 == 0o640

    params = load_params(params_path)  # through the strict config
    assert params.model.hidden_sizes == (512, 256) and params.train.batch_size == 64
    assert params.train.learning_rate == BEST["train.learning_rate"]
    assert params.train.ema_decay == 1e-05
    assert params.tune.applied.sweep == "4b1d9e" and params.tune.applied.trial == "t_00003"
    assert params.tune.applied.values == BEST
    # What DVC reads (YAML 1.2) is the same as what config reads.
    from ruamel.yaml import YAML
    assert YAML(typ="safe").load(after)["train"]["ema_decay"] == 1e-05


def test_a_second_apply_changes_the_record_and_nothing_already_equal(params_path: Path):
    apply_best(params_path, report())
    before = params_path.read_text()
    assert apply_best(params_path, report(trial="t_00007", sweep="77aa")) == []
    removed, added = changed_lines(before, params_path.read_text())
    assert (removed, added) == (["    sweep: 4b1d9e", "    trial: t_00003"],
                                ["    sweep: 77aa", "    trial: t_00007"])


def test_a_params_file_without_the_keys_or_the_tune_section_gets_them(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("# mine\ntrain:\n  epochs: 2  # short\n")
    lines = apply_best(path, report({"train.learning_rate": 0.01, "model.hidden_sizes": [64]}))
    assert lines == ["train.learning_rate: (unset) -> 0.01", "model.hidden_sizes: (unset) -> [64]"]
    assert path.read_text().startswith("# mine\ntrain:\n  epochs: 2  # short\n  learning_rate: "
                                       "0.01\nmodel:\n  hidden_sizes: [64]\ntune:\n")
    assert load_params(path).tune.applied.values["model.hidden_sizes"] == [64]


@pytest.mark.parametrize(("config", "cause"), [
    ({"train.batch_size": 0}, "invalid value for train.batch_size: 0; expected a value >= 1"),
    ({"model.hidden_sizes": []}, "model.hidden_sizes"),
    ({"train.learning_rat": 0.1}, "did you mean train.learning_rate?"),
    ({"train.optimizer": "adamw"}, "train.optimizer"),
])
def test_a_value_the_config_refuses_leaves_the_file_unchanged(params_path: Path, config, cause):
    before = params_path.read_bytes()
    with pytest.raises(ConfigError) as info:
        apply_best(params_path, report(config))
    message = str(info.value)
    assert cause in message and "\n" not in message
    assert message.startswith(f"the sweep's best config cannot be applied to {params_path}")
    assert message.endswith(f"{params_path} is unchanged")
    assert params_path.read_bytes() == before
    assert sorted(p.name for p in params_path.parent.iterdir()) == ["params.yaml"]  # no temp


@pytest.mark.parametrize("key", ["learning_rate", "train", "tune.applied", "train.a.b"])
def test_a_key_that_is_no_section_key_is_refused(params_path: Path, key: str):
    before = params_path.read_bytes()
    with pytest.raises(TuneReportError, match="expected a section.key of params.yaml"):
        apply_best(params_path, report({key: 1}))
    assert params_path.read_bytes() == before


@pytest.mark.parametrize(("text", "cause"), [
    (None, "not found: run `dltrain tune` first"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a sweep's report"),
    (json.dumps({"sweep": {"mlflow_run_id": "x"}, "trials": [], "best": None}),
     "has no best trial"),
    (json.dumps({"sweep": {}, "best": {"trial_id": "t", "config": {"train.epochs": 2}}}),
     "has no sweep.mlflow_run_id"),
    (json.dumps({"sweep": {"mlflow_run_id": "x"}, "best": {"trial_id": "t"}}),
     "has no best.config"),
])
def test_a_missing_or_malformed_report_is_one_line(tmp_path: Path, text, cause):
    path = tmp_path / "reports" / "tune.json"
    if text is not None:
        path.parent.mkdir()
        path.write_text(text)
    with pytest.raises(TuneReportError) as info:
        load_report(path)
    assert cause in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value) and info.value.exit_code == 2


@pytest.mark.parametrize(("text", "cause"), [
    (None, "params file not found"), ("train: [1\n", "is not valid YAML"),
    ("train: &a {epochs: 2}\nmodel: *a\n", "anchors and aliases"),
])
def test_an_unreadable_params_file_is_one_line(tmp_path: Path, text, cause):
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=cause):
        apply_best(path, report())
    assert (path.read_text() if text is not None else None) == text


def test_a_complete_report_loads(tmp_path: Path):
    path = tmp_path / "tune.json"
    path.write_text(json.dumps(report()))
    assert load_report(path) == report()


def test_the_repo_params_record_no_applied_sweep():
    """The committed params.yaml names no sweep (DVC needs the key: register reads it)."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert "applied" in raw["tune"] and raw["tune"]["applied"] is None
