"""dltrain/config.py: defaults, strictness, and errors that name the key, also through the CLI."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dltrain import cli
from dltrain.config import (
    QUOTE_CHARS,
    Params,
    apply_overrides,
    load_params,
    params_from_dict,
    parse_override,
    quote,
    read_params_file,
)
from dltrain.errors import ConfigError

from helpers.repo import REPO_ROOT, venv_env


def test_defaults_load_from_an_empty_mapping_and_from_the_repo_params():
    assert params_from_dict({}) == Params()
    assert params_from_dict(None) == Params()
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.dataset == "fashion-mnist"
    assert params.data.source is None
    assert 0 < params.data.val_fraction < 1
    assert params.model.hidden_sizes == (512,)  # the seed's 784-512-10
    assert set(params.to_dict()) == {"data", "model", "train", "evaluate", "register"}


def test_values_are_converted_to_the_dataclass_types():
    params = params_from_dict({"model": {"hidden_sizes": [256, 128]},
                               "train": {"learning_rate": 1, "ray_address": "ray://h:10001"}})
    assert params.model.hidden_sizes == (256, 128)
    assert isinstance(params.train.learning_rate, float)
    assert params.train.ray_address == "ray://h:10001"
    assert params.to_dict()["model"]["hidden_sizes"] == [256, 128]


BAD_PARAMS = [
    ({"trian": {}}, "trian"),  # unknown section
    ({"train": {"epoch": 3}}, "train.epoch"),  # unknown key
    ({"train": {"epochs": "5"}}, "train.epochs"),  # wrong type
    ({"train": {"epochs": True}}, "train.epochs"),  # bool is not an int here
    ({"train": {"epochs": 2.5}}, "train.epochs"),
    ({"train": {"epochs": 0}}, "train.epochs"),  # out of range
    ({"train": {"use_gpu": 1}}, "train.use_gpu"),  # int is not a bool
    ({"train": {"learning_rate": 0}}, "train.learning_rate"),
    ({"train": {"optimizer": "adagrad"}}, "train.optimizer"),
    ({"train": {"batch_size": 100, "num_workers": 3}}, "train.batch_size"),  # not divisible
    ({"train": {"threads_per_worker": 0}}, "train.threads_per_worker"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction"),
    ({"data": {"val_fraction": 0}}, "data.val_fraction"),
    ({"data": {"dataset": "cifar10"}}, "data.dataset"),
    ({"data": {"source": 3}}, "data.source"),
    ({"data": {"seed": None}}, "data.seed"),
    ({"data": 3}, "data"),  # a section that is not a mapping
    ({"model": {"hidden_sizes": []}}, "model.hidden_sizes"),
    ({"model": {"hidden_sizes": [512, "x"]}}, "model.hidden_sizes[1]"),
    ({"model": {"hidden_sizes": 512}}, "model.hidden_sizes"),
    ({"evaluate": {"batch_size": -1}}, "evaluate.batch_size"),
    ({"register": {"min_accuracy": 2}}, "register.min_accuracy"),
    ({"register": {"model_name": " "}}, "register.model_name"),
]


@pytest.mark.parametrize(("raw", "key"), BAD_PARAMS, ids=[k for _, k in BAD_PARAMS])
def test_each_bad_input_is_a_config_error_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    assert key in str(info.value)


def test_params_that_are_not_a_mapping_are_refused():
    with pytest.raises(ConfigError, match="mapping"):
        params_from_dict([1, 2])


@pytest.mark.parametrize(("text", "expected"), [
    ("train.epochs=3", ("train.epochs", 3)),
    ("train.use_gpu=true", ("train.use_gpu", True)),
    ("data.source=null", ("data.source", None)),
    ("model.hidden_sizes=[256, 128]", ("model.hidden_sizes", [256, 128])),
    ("data.source=https://example.org/a=b", ("data.source", "https://example.org/a=b")),
])
def test_overrides_parse_their_value_as_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.epochs", "epochs=3", "train.epochs=[1,"])
def test_bad_override_syntax_is_a_config_error_quoting_it(text):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert repr(text) in str(info.value)


def test_overrides_win_over_the_file_and_are_validated(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 5\n")
    assert load_params(path, {"train.epochs": 2}).train.epochs == 2
    with pytest.raises(ConfigError, match="train.epochs"):
        load_params(path, {"train.epochs": -1})
    with pytest.raises(ConfigError, match="train.epoch"):
        load_params(path, {"train.epoch": 2})
    raw = {"train": {"epochs": 5}}
    apply_overrides(raw, {"train.epochs": 9})
    assert raw == {"train": {"epochs": 5}}, "the caller's mapping must not change"


def test_a_missing_or_unparsable_params_file_is_a_config_error_naming_it(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        read_params_file(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        read_params_file(bad)
    assert str(bad) in str(info.value)


# --- through the CLI: a clear error before any work, nothing written --------------------------

@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


@pytest.mark.parametrize(("override", "key"), [
    ("data.val_fraction=2", "data.val_fraction"),
    ("data.val_fraction", "data.val_fraction"),  # bad override syntax
    ("data.datset=mnist", "data.datset"),
])
def test_cli_bad_params_exit_non_zero_naming_the_key_and_write_nothing(
        workspace: Path, capsys: pytest.CaptureFixture[str], override: str, key: str):
    code = cli.main(["download", "--workspace", str(workspace), "-S", override])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code != 0
    assert key in err
    assert err.count("\n") == 1, "one line, no traceback"
    assert sorted(p.name for p in workspace.iterdir()) == ["params.yaml"]


def test_cli_console_script_reports_bad_params(workspace: Path):
    """The installed `dltrain` command, as a user runs it."""
    proc = subprocess.run(["dltrain", "download", "-S", "data.val_fraction=2"], cwd=workspace,
                          env=venv_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "data.val_fraction" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in workspace.iterdir()) == ["params.yaml"]


# ----------------------------------------------------------------------------- property-based
# Random and malformed mappings, values and override strings: the loader either returns
# Params or raises ConfigError with a message; never another exception, never a hang.

PROPERTY_SETTINGS = settings(max_examples=300, deadline=2000,
                             suppress_health_check=[HealthCheck.too_slow])
SECTIONS = ["data", "model", "train", "evaluate", "register"]
KEYS = ["dataset", "source", "val_fraction", "seed", "hidden_sizes", "epochs", "batch_size",
        "learning_rate", "optimizer", "num_workers", "use_gpu", "ray_address", "storage_path",
        "max_failures", "threads_per_worker", "placement_strategy", "model_name",
        "tracking_uri", "min_accuracy", "min_improvement"]
# What YAML can produce: scalars of every type, lists and mappings, nested.
yaml_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                | st.dates() | st.sampled_from(["fashion-mnist", "mnist", "rmsprop", "PACK"]))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8) | st.integers(), inner,
                                             max_size=4), max_leaves=12)
sections = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8) | st.integers(),
                           yaml_values, max_size=6)
mappings = st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=8) | st.integers()
                           | st.none(), sections | yaml_values, max_size=5)


def _loads_or_config_error(call) -> None:
    try:
        result = call()
    except ConfigError as exc:
        assert str(exc).strip(), "a ConfigError without a message"
        return
    assert isinstance(result, Params)


@PROPERTY_SETTINGS
@given(raw=mappings | yaml_values)
@example(raw={1: {}, "x": {}})  # keys of mixed types: sorting them must not raise
@example(raw={"train": {"epochs": 10 ** 30, "batch_size": 7, "num_workers": 3}})
@example(raw={"data": {"val_fraction": float("nan")}})
def test_any_mapping_gives_params_or_a_config_error(raw) -> None:
    _loads_or_config_error(lambda: params_from_dict(raw))


@PROPERTY_SETTINGS
@given(text=st.text(max_size=60))
@example(text="train.epochs=2024-13-01")  # PyYAML: ValueError for an impossible date
@example(text="train.epochs=" + "[" * 700)  # PyYAML: RecursionError
@example(text="=")
@example(text="train.epochs=!!python/object:os.system ls")  # safe_load refuses tags
def test_any_override_string_is_parsed_or_a_config_error(text: str) -> None:
    try:
        key, value = parse_override(text)
    except ConfigError as exc:
        # The override as typed (its repr), cut to a readable length when long.
        assert quote(text) in str(exc) and len(quote(text)) <= QUOTE_CHARS
        return
    _loads_or_config_error(lambda: params_from_dict(apply_overrides({}, {key: value})))


@PROPERTY_SETTINGS
@given(text=st.text(max_size=200) | st.sampled_from(["- a\n- b\n", "42", "[", "a: [1, 2"]))
def test_any_params_file_loads_or_is_a_config_error(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "prop-params.yaml"
    path.write_text(text)
    _loads_or_config_error(lambda: load_params(path))


# --- YAML as people write it -------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [
    ("learning_rate: 1e-3", 0.001),  # PyYAML reads 1e-3 as a string
    ("learning_rate: 0.001", 0.001),
    ("learning_rate: 1", 1.0),
    ("learning_rate: '2.5E-4'", 0.00025),
])
def test_numbers_are_read_as_written(tmp_path: Path, text: str, value: float):
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  {text}\n")
    learning_rate = load_params(path).train.learning_rate
    assert isinstance(learning_rate, float) and learning_rate == pytest.approx(value)


@pytest.mark.parametrize("text", ["learning_rate: .inf", "learning_rate: .nan",
                                  "learning_rate: -.inf", "ema_decay: .nan",
                                  "learning_rate: 1e999"])
def test_non_finite_numbers_are_refused(tmp_path: Path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  {text}\n")
    with pytest.raises(ConfigError, match=f"train.{text.split(':')[0]}: .*finite"):
        load_params(path)


FLOAT_KEYS = [(section, name) for section, model in Params.model_fields.items()
              for name, field in model.annotation.model_fields.items()
              if field.annotation is float]


@pytest.mark.parametrize("written", [".inf", "-.inf", ".nan", "'inf'", "'-Infinity'", "'nan'",
                                     "1e999"])
@pytest.mark.parametrize(("section", "name"), FLOAT_KEYS, ids=[".".join(k) for k in FLOAT_KEYS])
def test_every_float_key_refuses_non_finite_values(tmp_path: Path, section: str, name: str,
                                                   written: str):
    """YAML's infinities and NaN, the same as strings, and an overflowing literal: all refused
    by every float setting, before any stage runs."""
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {name}: {written}\n")
    with pytest.raises(ConfigError, match=f"{section}.{name}: .*finite"):
        load_params(path)


def test_the_float_keys_are_all_found():
    assert {".".join(k) for k in FLOAT_KEYS} == {
        "data.val_fraction", "data.download_timeout_s", "train.learning_rate", "train.ema_decay",
        "register.min_accuracy", "register.min_improvement", "tune.reduction_factor"}


@pytest.mark.parametrize(("raw", "hint"), [
    ({"train": {"epoch": 3}}, "did you mean train.epochs?"),
    ({"train": {"learningrate": 0.1}}, "did you mean train.learning_rate?"),
    ({"trian": {}}, "did you mean 'train'?"),
    ({"regster": {}}, "did you mean 'register'?"),
    ({"data": {"dataset": "mnsit"}}, "'mnsit' (did you mean 'mnist'?); expected one of"),
    ({"data": {"dataset": "Fashion_MNIST"}}, "(did you mean 'fashion-mnist'?)"),
])
def test_unknown_keys_suggest_the_nearest_one(raw, hint):
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    assert hint in str(info.value)
    assert "\n" not in str(info.value)


def test_a_data_set_name_far_from_any_suggests_none_and_lists_them():
    with pytest.raises(ConfigError) as info:
        params_from_dict({"data": {"dataset": "cifar10"}})
    assert "did you mean" not in str(info.value) and "'fashion-mnist' or 'mnist'" in str(info.value)


def test_the_data_set_check_suggests_the_nearest_name():
    from dltrain.data.datasets import check_dataset_name

    with pytest.raises(ConfigError, match=r"'fashion_mnist' for data\.dataset \(did you mean "
                                          r"'fashion-mnist'\?\); expected one of: mnist, "):
        check_dataset_name("fashion_mnist")


def test_negative_seeds_are_refused_before_any_work():
    for key in ("data", "train"):
        with pytest.raises(ConfigError, match=f"{key}.seed: -1; expected a value >= 0"):
            params_from_dict({key: {"seed": -1}})


# --- hostile params files: an alias bomb, huge values, bytes that are not UTF-8 -------------

def _alias_bomb(levels: int, width: int = 10) -> str:
    """YAML whose anchors nest: `levels` lines of text expand to width**levels values."""
    lines = ["x0: &x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, levels):
        lines.append(f"x{level}: &x{level} [" + ", ".join([f"*x{level - 1}"] * width) + "]")
    return "\n".join(lines)


def test_an_alias_bomb_in_params_is_refused_before_it_expands(tmp_path: Path):
    # 700 bytes of text, a million values once expanded (each further level: ten times more).
    bomb = _alias_bomb(6).replace("\n", "\n  ")
    path = tmp_path / "params.yaml"
    path.write_text(f"model:\n  {bomb}\n  hidden_sizes: *x5\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert time.monotonic() - started < 2
    assert str(path) in message and "anchors and aliases" in message and "line 2" in message
    assert len(message) < 400 and "\n" not in message


def test_an_alias_bomb_in_an_override_is_refused(tmp_path: Path):
    inline = "[" + ", ".join(["&a [1, 1]"] + ["*a"] * 9) + "]"
    with pytest.raises(ConfigError, match="anchors and aliases"):
        parse_override(f"model.hidden_sizes={inline}")


@pytest.mark.parametrize(("raw", "key"), [
    ({"model": {"hidden_sizes": [[1] * 20000]}}, "model.hidden_sizes[0]"),
    ({"data": {"dataset": "x" * 100000}}, "data.dataset"),
    ({"data": {"seed": "y" * 100000}}, "data.seed"),
    ({"train": {"z" * 100000: 1}}, "unknown key train."),
    ({"z" * 100000: {}}, "unknown section"),
    ({"train": ["t"] * 20000}, "invalid section train"),
])
def test_a_value_quoted_in_an_error_is_cut_to_a_readable_length(raw, key):
    with pytest.raises(ConfigError) as info:
        params_from_dict(raw)
    message = str(info.value)
    assert key in message and len(message) < 600, message[:700]


def test_a_huge_override_is_quoted_cut(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        parse_override("train.epochs" + "9" * 100000)
    assert "…" in str(info.value) and len(str(info.value)) < 600


def test_invalid_utf8_in_params_is_one_line_naming_the_file_and_the_byte(
        workspace: Path, capsys: pytest.CaptureFixture[str]):
    path = workspace / "params.yaml"
    offset = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\xff\xfe")
    code = cli.main(["check", "--workspace", str(workspace)])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and f"byte {offset}" in err and "UTF-8" in err
    assert sorted(p.name for p in workspace.iterdir()) == ["params.yaml"]
