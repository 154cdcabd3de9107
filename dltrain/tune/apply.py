"""Apply a sweep's winner to params.yaml: `dltrain tune --apply` / `--apply-only`.

The best trial's values (reports/tune.json's `best.config`, keyed `section.key`) are written
into params.yaml as a round-trip edit (ruamel.yaml): comments, key order, flow lists such as
`[512]` and `null`s stay as they were, so a diff of the file shows the changed values and the
`tune.applied` record of where they came from (the sweep's MLflow run, the trial, the values),
nothing else. The ordinary `dvc repro` then trains, evaluates and registers the tuned model
through the gate, and register tags the version with the sweep when the model it registers was
trained with exactly these values.

The edited text is validated by the strict config before it is written (atomically): a value
that config refuses leaves params.yaml untouched.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from dltrain.atomic import atomic_path
from dltrain.config import params_from_dict, quote, read_params_file, shorten
from dltrain.errors import ConfigError, DltrainError

APPLIED_COMMENT = ("written by `dltrain tune --apply`: the sweep (its MLflow run), the trial and\n"
                   "the values it applied; register tags a version trained with them")


class TuneReportError(DltrainError):
    """reports/tune.json is missing, unreadable, or holds no best trial to apply."""

    exit_code = 2


def load_report(path: Path) -> dict[str, Any]:
    """reports/tune.json as a mapping, checked to name a best trial to apply."""
    path = Path(path)
    rerun = "re-run `dltrain tune` (a finished sweep resumes and writes it again)"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TuneReportError(f"{path} not found: run `dltrain tune` first; it writes the "
                              "sweep's results there") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TuneReportError(f"{path} is not valid JSON ({shorten(str(exc))}); {rerun}"
                              ) from None
    best_of(report, path)
    return report


def best_of(report: Any, source: Path | str = "reports/tune.json") -> tuple[str, str, dict]:
    """The sweep's MLflow run id, the best trial's id and its config, checked."""
    rerun = "re-run `dltrain tune` to write it again"
    if not isinstance(report, dict):
        raise TuneReportError(f"{source} is not a sweep's report (expected a mapping with "
                              f"sweep, trials and best); {rerun}")
    best, sweep = report.get("best"), report.get("sweep")
    if best is None and isinstance(report.get("trials"), list):
        raise TuneReportError(f"{source} has no best trial (no trial reported the metric): "
                              "nothing to apply; see its trials' status")
    config = best.get("config") if isinstance(best, dict) else None
    trial = best.get("trial_id") if isinstance(best, dict) else None
    run_id = sweep.get("mlflow_run_id") if isinstance(sweep, dict) else None
    missing = [name for name, value in (("best.config", config), ("best.trial_id", trial),
                                        ("sweep.mlflow_run_id", run_id)) if not value]
    if missing or not isinstance(config, dict):
        raise TuneReportError(f"{source} has no {', '.join(missing) or 'best.config mapping'}: "
                              f"it is not a complete sweep report; {rerun}")
    return str(run_id), str(trial), config


def _yaml() -> YAML:
    yaml = YAML()  # round-trip
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long value
    # ruamel writes a null mapping value as nothing (`key:`); params.yaml spells it `null`.
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    # A new float as Python writes it, with a dot before any exponent (1.0e-05): YAML 1.1
    # readers (PyYAML: config, tests) read `1e-05` as a string.
    yaml.representer.add_representer(float, lambda rep, value: rep.represent_scalar(
        "tag:yaml.org,2002:float", _float_text(value)))
    return yaml


def _float_text(value: float) -> str:
    text = repr(value)
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def _styled(new: Any, old: Any) -> Any:
    """`new` as a node that keeps `old`'s layout: a list in flow style (`[512, 256]`) unless
    the old one was a block list."""
    if isinstance(new, list):
        seq = CommentedSeq(_styled(item, None) for item in new)
        if not isinstance(old, CommentedSeq) or old.fa.flow_style() is not False:
            seq.fa.set_flow_style()
        return seq
    return new


def _split(dotted: Any) -> tuple[str, str]:
    section, _, key = str(dotted).partition(".")
    if not section or not key or "." in key or section == "tune":
        raise TuneReportError(f"the best config names {quote(dotted)}: expected a section.key "
                              "of params.yaml such as train.learning_rate")
    return section, key


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if isinstance(value, (list, dict, type(None), bool)) else str(value)


def _plain(value: Any) -> Any:
    """A loaded YAML value as plain JSON-ready data (a CommentedSeq as a list, ...)."""
    return json.loads(json.dumps(value, default=str))


def render_applied(text: str, config: dict[str, Any], sweep: str, trial: str
                   ) -> tuple[str, list[str]]:
    """`text` (a params.yaml) with `config`'s values set and `tune.applied` recording them,
    and the changed keys as `key: old -> new` lines."""
    yaml = _yaml()
    doc = yaml.load(text) or CommentedMap()
    changes = []
    for dotted, value in config.items():
        section, key = _split(dotted)
        if doc.get(section) is None:
            doc[section] = CommentedMap()
        if not isinstance(doc[section], dict):
            raise ConfigError(f"invalid section {shorten(section)}: expected a mapping")
        old = doc[section].get(key)
        if key in doc[section] and _plain(old) == value:
            continue
        changes.append(f"{dotted}: {_show(_plain(old)) if key in doc[section] else '(unset)'}"
                       f" -> {_show(value)}")
        doc[section][key] = _styled(value, old)
    if doc.get("tune") is None:
        doc["tune"] = CommentedMap()
    values = CommentedMap((str(k), _styled(v, None)) for k, v in config.items())
    had_record = "applied" in doc["tune"]
    doc["tune"]["applied"] = CommentedMap(sweep=sweep, trial=trial, values=values)
    if not had_record:
        doc["tune"].yaml_set_comment_before_after_key("applied", before=APPLIED_COMMENT, indent=2)
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue(), changes


def _check(written: Path, config: dict[str, Any], path: Path) -> None:
    """The edited params (the file about to replace `path`) validate, and read back with the
    values meant."""
    try:
        params = params_from_dict(read_params_file(written)).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"the sweep's best config cannot be applied to {path}: "
                          f"{str(exc).replace(str(written), str(path))}; {path} is unchanged"
                          ) from None
    for dotted, value in config.items():
        section, key = _split(dotted)
        if params[section][key] != value:
            raise ConfigError(f"the sweep's best config cannot be applied to {path}: "
                              f"{dotted} would read back as {quote(params[section][key])}, not "
                              f"{quote(value)}; {path} is unchanged")


def apply_best(params_path: Path, report: dict[str, Any]) -> list[str]:
    """Write the best trial's values of `report` (reports/tune.json) into params.yaml, and
    `tune.applied`; return one `key: old -> new` line per changed key."""
    params_path = Path(params_path)
    sweep, trial, config = best_of(report)
    read_params_file(params_path)  # not there, not UTF-8, not YAML: one line, as config says
    text = params_path.read_text(encoding="utf-8")
    new_text, changes = render_applied(text, config, sweep, trial)
    mode = params_path.stat().st_mode & 0o777
    with atomic_path(params_path) as tmp:  # an error in the block leaves params.yaml as it is
        tmp.write_text(new_text, encoding="utf-8")
        os.chmod(tmp, mode)
        _check(tmp, config, params_path)
    return changes
