"""Typed, strict configuration: one dataclass per params.yaml section.

Loaded once, at the edge (the CLI, the flow), and passed down as plain values. Unknown keys,
wrong types and out-of-range values raise ConfigError naming the key and what is allowed,
before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from dltrain.errors import ConfigError

DATASETS = ("fashion-mnist", "mnist")
RAY_ADDRESS = re.compile(r"local|auto|(ray://)?[\w.\-\[\]:]+:\d{1,5}")


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion-mnist", "mnist"] = "fashion-mnist"
    # None = the data set's known mirrors; else a directory, file:// or https:// URL holding
    # the four standard IDX files.
    source: str | None = None
    val_fraction: float = 0.1
    seed: int = 42

    def validate(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction,
               "a number strictly between 0 and 1")


@dataclass(frozen=True)
class ModelConfig:
    hidden_sizes: tuple[int, ...] = (512,)

    def validate(self) -> None:
        _check(len(self.hidden_sizes) >= 1 and all(h >= 1 for h in self.hidden_sizes),
               "model.hidden_sizes", list(self.hidden_sizes),
               "a non-empty list of positive layer widths, e.g. [512]")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128  # global: split evenly across the workers
    learning_rate: float = 0.001
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    num_workers: int = 1
    use_gpu: bool = False
    # local: a private one-shot Ray; auto (None too): RAY_ADDRESS, else the workspace's warm
    # Ray (`make ray-up`), else a private one; or HOST:PORT / ray://HOST:PORT of a cluster.
    ray_address: str | None = "auto"
    storage_path: str | None = None  # None = <repo>/.ray_results; shared storage on a cluster
    max_failures: int = 2
    seed: int = 42
    threads_per_worker: int | None = None  # None = the CPUs Ray gives each worker
    # Validate and ship an exponential moving average of the weights (0 = the raw weights).
    ema_decay: float = 0.99
    # PACK fills a node before the next; SPREAD/STRICT_SPREAD put workers on separate nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self) -> None:
        _check(self.epochs >= 1, "train.epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _check(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "a number > 0")
        _check(self.num_workers >= 1, "train.num_workers", self.num_workers, "an integer >= 1")
        _check(self.max_failures >= -1, "train.max_failures", self.max_failures,
               "an integer >= 0 (or -1 for unlimited retries)")
        _check(self.batch_size % self.num_workers == 0, "train.batch_size", self.batch_size,
               f"a multiple of train.num_workers ({self.num_workers}), so that the global "
               "batch splits evenly across workers")
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", self.ema_decay,
               "a number in [0, 1): 0 turns weight averaging off")
        _check(self.threads_per_worker is None or self.threads_per_worker >= 1,
               "train.threads_per_worker", self.threads_per_worker, "null or an integer >= 1")
        _check(self.ray_address is None or bool(RAY_ADDRESS.fullmatch(self.ray_address)),
               "train.ray_address", self.ray_address,
               "local (a private Ray), auto (a running one, else local), or a cluster's "
               "HOST:PORT or ray://HOST:PORT")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 1000

    def validate(self) -> None:
        _check(self.batch_size >= 1, "evaluate.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "mnist-mlp"
    tracking_uri: str | None = None  # None = MLFLOW_TRACKING_URI if set, else embedded SQLite
    min_accuracy: float = 0.8
    min_improvement: float = 0.0

    def validate(self) -> None:
        _check(bool(self.model_name.strip()), "register.model_name", self.model_name,
               "a non-empty name")
        _check(0.0 <= self.min_accuracy <= 1.0, "register.min_accuracy", self.min_accuracy,
               "a number between 0 and 1")
        _check(0.0 <= self.min_improvement <= 1.0, "register.min_improvement",
               self.min_improvement, "a number between 0 and 1")


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-ready values (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for {key}: {value!r}; expected {allowed}")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in get_args(tp) if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in get_args(tp) else "")
    if origin is tuple:
        return f"a list of {_describe(get_args(tp)[0])}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it in the dataclass' own type."""
    origin = get_origin(tp)
    wrong = ConfigError(f"invalid type for {key}: {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"invalid value for {key}: {value!r}; expected {_describe(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise wrong
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    # bool is a subclass of int in Python: refuse `epochs: true` explicitly.
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise AssertionError(f"unsupported annotation {tp!r} for {key}")  # pragma: no cover


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid section {name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(known), key=str)  # YAML keys need not be strings
    if unknown:
        raise ConfigError(f"unknown key {name}.{unknown[0]}; the keys of {name} are: "
                          + ", ".join(known))
    values = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()}
    section = cls(**values)
    section.validate()
    return section


def params_from_dict(raw: Any) -> Params:
    """Build and validate Params from a parsed params.yaml mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    hints = typing.get_type_hints(Params)
    unknown = sorted(set(raw) - set(sections), key=str)
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; the sections are: "
                          + ", ".join(sections))
    return Params(**{name: _build_section(name, hints[name], raw.get(name)) for name in sections})


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `section.key=value` override; the value is YAML (3, true, null, [256])."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"invalid override {text!r}; expected section.key=value, "
                          "e.g. train.epochs=3")
    try:
        return key.strip(), yaml.safe_load(value)
    # PyYAML raises ValueError for an impossible date (2024-13-01) and RecursionError for
    # deeply nested brackets: both are a bad value, not a bug.
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(
            f"invalid override {text!r}: the value is not valid YAML ({exc})") from exc


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the raw mapping with `section.key` overrides set."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not isinstance(merged.get(section, {}), dict):
            raise ConfigError(f"invalid section {section}: expected a mapping")
        merged.setdefault(section, {})[key] = value
    return merged


def read_params_file(path: Path) -> dict[str, Any]:
    """Read params.yaml as a raw mapping; a missing or unparsable file is a ConfigError."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as exc:
        raise ConfigError(f"params file not found: {path}") from exc
    try:
        raw = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (data:, model:, train:, ...), "
                          f"got a {type(raw).__name__}")
    return raw


def load_params(path: Path | str = "params.yaml",
                overrides: dict[str, Any] | None = None) -> Params:
    """Load, override and validate params.yaml."""
    raw = read_params_file(Path(path))
    return params_from_dict(apply_overrides(raw, overrides or {}))
