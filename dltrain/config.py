"""Typed, strict configuration: one pydantic model per params.yaml section.

Loaded once, at the edge (the CLI, the flow), and passed down as plain values. Unknown keys
(with a "did you mean"), wrong types, out-of-range and non-finite values raise ConfigError
naming the key and what is allowed, before any work starts. Numbers are read as people write
them in YAML: `1e-3` (which PyYAML reads as a string) is the float 0.001; an integer setting
takes an integer, and a boolean one true or false, nothing that merely converts to one.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from dltrain.errors import ConfigError
from dltrain.paths import PARAMS_FILE
from dltrain.urls import password_of, redact_text

DATASETS = ("fashion-mnist", "mnist")
# The most characters of a value an error message quotes: a value can be megabytes long (a
# pasted list, an expanded YAML alias), and the message reaches terminals, logs and, in a
# flow run, the state message of the run.
QUOTE_CHARS = 200
RAY_ADDRESS = re.compile(r"local|auto|(ray://)?[\w.\-\[\]:]+:\d{1,5}")


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """`text` cut to `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def quote(value: Any) -> str:
    """`value` as an error message shows it: its repr, cut to a readable length."""
    return shorten(repr(value))


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors (`&name`) and aliases (`*name`): a few lines of
    nested aliases expand to billions of values (an "alias bomb"), and params have no use for
    them. Checked on each event before the node is built, so nothing is ever expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasFound(event.start_mark.line + 1)
        return super().compose_node(parent, index)


class _AliasFound(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


_NO_ALIASES = ("YAML anchors and aliases (&name, *name) are not allowed in params; write the "
               "value out")


def _safe_load(text: str) -> Any:
    """yaml.safe_load without anchors and aliases (_AliasFound names the line)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def _number(value: Any) -> Any:
    """A float setting: an int, a float, or a numeric string such as "1e-3"; finite."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("expected a number") from None
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return float(value)
    raise ValueError("expected a number")


Number = Annotated[float, BeforeValidator(_number)]

# Where a setting's value goes, dvc.lock (and so git) records it: a password in a URL there is a
# password at rest. What to use instead, per key.
_CREDENTIALS_INSTEAD = {
    "register.tracking_uri": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                             "a ~/.netrc entry for the host) and give the URL without them",
    "data.source": "put the login in a ~/.netrc entry for the host (machine HOST login USER "
                   "password ...), which the download and the check send, and give the URL "
                   "without it",
    "train.storage_path": "use the storage's own credentials (AWS_ACCESS_KEY_ID / "
                          "AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, "
                          "GOOGLE_APPLICATION_CREDENTIALS) and give the URL without them",
}


def _no_password(key: str):
    """A validator refusing a URL with user:password in it, naming what to use instead."""
    def check(value: Any) -> Any:
        if isinstance(value, str) and password_of(value):
            raise ValueError(f"a password in the URL would be written to dvc.lock (and so "
                             f"git) and to the outputs; {_CREDENTIALS_INSTEAD[key]}")
        return value
    return BeforeValidator(check)


def _ray_address(value: Any) -> Any:
    if isinstance(value, str) and not RAY_ADDRESS.fullmatch(value):
        raise ValueError("expected local (a private Ray), auto (a running one, else local), "
                         "or a cluster's HOST:PORT or ray://HOST:PORT")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["fashion-mnist", "mnist"] = "fashion-mnist"
    # None = the data set's known mirrors; else a directory, file:// or https:// URL holding
    # the four standard IDX files.
    source: Annotated[StrictStr, _no_password("data.source")] | None = None
    val_fraction: Number = Field(0.1, gt=0.0, lt=1.0)
    seed: StrictInt = Field(42, ge=0)
    # Bounds on fetching one file, in the freshness check and the download: the whole transfer
    # of a file must end within download_timeout_s (a source that trickles bytes or never ends
    # its body is given up on); a file of a data.source may be at most max_file_bytes (the
    # known data sets' files are bounded by their published sizes). 1 GiB: the IDX reader
    # refuses more data than that anyway.
    download_timeout_s: Number = Field(300.0, gt=0.0)
    max_file_bytes: StrictInt = Field(1 << 30, ge=1)


class ModelConfig(_Section):
    hidden_sizes: tuple[Annotated[StrictInt, Field(ge=1)], ...] = Field((512,), min_length=1)


class TrainConfig(_Section):
    epochs: StrictInt = Field(5, ge=1)
    batch_size: StrictInt = Field(128, ge=1)  # global: split evenly across the workers
    learning_rate: Number = Field(0.001, gt=0.0)
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    # 0: Ray Train's local mode, the training function in this process (no Ray started, no
    # worker group, no retries); 1 or more: a Ray Train worker group (DDP across them).
    num_workers: StrictInt = Field(1, ge=0)
    # With num_workers 0: this process' GPU (checked by the train stage before it trains).
    use_gpu: StrictBool = False
    # local: a private one-shot Ray; auto (None too): RAY_ADDRESS, else the workspace's warm
    # Ray (`make ray-up`), else a private one; or HOST:PORT / ray://HOST:PORT of a cluster.
    ray_address: Annotated[StrictStr, BeforeValidator(_ray_address)] | None = "auto"
    # None = <repo>/.ray_results; shared on a cluster
    storage_path: Annotated[StrictStr, _no_password("train.storage_path")] | None = None
    max_failures: StrictInt = Field(2, ge=-1)  # -1: unlimited retries
    seed: StrictInt = Field(42, ge=0)
    threads_per_worker: StrictInt | None = Field(None, ge=1)  # None = the CPUs of a worker
    # Validate and ship an exponential moving average of the weights (0 = the raw weights).
    ema_decay: Number = Field(0.99, ge=0.0, lt=1.0)
    # PACK fills a node before the next; SPREAD/STRICT_SPREAD put workers on separate nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @model_validator(mode="after")
    def _batch_splits(self) -> TrainConfig:
        # Local mode (0 workers) is one process: the whole global batch.
        if self.num_workers and self.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size {self.batch_size} is not a multiple of "
                             f"train.num_workers ({self.num_workers}), so the global batch does "
                             "not split evenly across workers")
        return self


class EvaluateConfig(_Section):
    batch_size: StrictInt = Field(1000, ge=1)


class RegisterConfig(_Section):
    model_name: StrictStr = Field("mnist-mlp", pattern=r"\S")
    # None = MLFLOW_TRACKING_URI (a password there is allowed: it reaches no file), else the
    # embedded SQLite store.
    tracking_uri: Annotated[StrictStr, _no_password("register.tracking_uri")] | None = None
    min_accuracy: Number = Field(0.8, ge=0.0, le=1.0)
    min_improvement: Number = Field(0.0, ge=0.0, le=1.0)


# What a sweep may vary: these keys' values are the same for every trial (where and how trials
# run, not what they train).
TUNE_FIXED_KEYS = ("train.num_workers", "train.use_gpu", "train.ray_address",
                   "train.storage_path", "train.max_failures", "train.threads_per_worker",
                   "train.placement_strategy")
TUNE_SECTIONS = ("train", "model")  # data.* would need other processed data: not a trial's
# What every epoch of training reports on the validation split (dltrain.train.loop); a sweep
# chooses on these, never on a test-set figure.
TUNE_METRICS = ("val_accuracy", "val_loss")
# Tune's distributions, as params.yaml spells them: {loguniform: [lo, hi]} ...
TUNE_DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


def _tune_metric(value: Any) -> Any:
    if isinstance(value, str) and value not in TUNE_METRICS:
        hint = " (a sweep chooses on validation figures: test figures are the gate's)" \
            if value.startswith("test") else ""
        raise ValueError(f"a metric each epoch reports: {' or '.join(TUNE_METRICS)}{hint}")
    return value


class TuneApplied(_Section):
    """Where params.yaml's tuned values came from, written by `dltrain tune --apply`: the
    sweep's MLflow parent run, the trial, and the values it wrote (register tags a version with
    the sweep only when the model was trained with exactly these)."""

    sweep: StrictStr = Field(pattern=r"\S")
    trial: StrictStr = Field(pattern=r"\S")
    values: dict[StrictStr, Any] = Field(default_factory=dict)


class TuneConfig(_Section):
    """The `tune:` section: a hyperparameter sweep on Ray Tune (dltrain.tune). No stage reads it,
    so editing it never re-runs one."""
    num_samples: StrictInt = Field(8, ge=1)  # trials (a grid multiplies, as in Ray Tune)
    metric: Annotated[StrictStr, BeforeValidator(_tune_metric)] = "val_accuracy"
    mode: Literal["max", "min"] | None = None  # None: max for accuracy, min for loss
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: StrictInt = Field(1, ge=1)  # ASHA: epochs every trial gets
    reduction_factor: Number = Field(2.0, gt=1.0)
    search: Literal["random", "optuna", "hyperopt"] = "random"
    max_concurrent_trials: StrictInt | None = Field(None, ge=1)  # None: as the CPUs hold
    seed: StrictInt = Field(42, ge=0)  # the search's: the same space samples the same trials
    # The first trial trains params.yaml's own values of the space's keys, when they lie in the
    # space: the sweep then measures the winner against what the pipeline trains now.
    baseline: StrictBool = True
    # dotted train./model. key -> {distribution: args} or a fixed value (checked by check_space)
    space: dict[StrictStr, Any] = Field(default_factory=dict)
    applied: TuneApplied | None = None

    @property
    def objective_mode(self) -> str:
        return self.mode or ("min" if self.metric.endswith("loss") else "max")


with warnings.catch_warnings():
    # The section `register` has the name of a method pydantic models inherit from abc
    # (ABCMeta.register, for virtual subclasses), which nothing here uses; pydantic warns.
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Params(_Section):
        data: DataConfig = Field(default_factory=DataConfig)
        model: ModelConfig = Field(default_factory=ModelConfig)
        train: TrainConfig = Field(default_factory=TrainConfig)
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
        register: RegisterConfig = Field(default_factory=RegisterConfig)
        tune: TuneConfig = Field(default_factory=TuneConfig)

        def to_dict(self) -> dict[str, Any]:
            """Plain, YAML/JSON-ready values (tuples become lists) of the sections a run is made
            of: `tune` describes sweeps, not the run (a model card, a run's MLflow params)."""
            return self.model_dump(mode="json", exclude={"tune"})


def params_from_dict(raw: Any) -> Params:
    """Build and validate Params from a parsed params.yaml mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    for name in raw:
        if name not in Params.model_fields:
            raise ConfigError(_unknown([name]))
    raw = {k: ({} if v is None else v) for k, v in raw.items()}
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        # The value is quoted: a URL's password must not be (the message reaches logs).
        raise ConfigError(redact_text(describe_error(exc))) from None
    check_space(params)
    return params


# What to say a value should be, by pydantic's error type (its ctx fills the braces).
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "float_type": "a number", "float_parsing": "a number",
    "finite_number": "a finite number",
    "greater_than": "a value > {gt}", "greater_than_equal": "a value >= {ge}",
    "less_than": "a value < {lt}", "less_than_equal": "a value <= {le}",
    "literal_error": "one of {expected}", "tuple_type": "a list",
    "too_short": "a non-empty list, e.g. [512]", "string_pattern_mismatch": "a non-empty name",
    "model_type": "a mapping of keys", "dict_type": "a mapping of keys",
}


def describe_error(exc: ValidationError) -> str:
    """pydantic's first error as one line that names the key: `unknown key train.epoch; did
    you mean train.epochs? ...` or `invalid value for train.epochs: 0; expected a value >= 1`."""
    error = exc.errors(include_url=False)[0]
    loc = [part for part in error["loc"] if not str(part).startswith("function-")]
    key = ".".join(shorten(str(p)) for p in loc if not isinstance(p, int))
    key += "".join(f"[{p}]" for p in loc if isinstance(p, int))
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown(loc)
    if kind == "value_error":
        reason = str(error["ctx"]["error"])
        if reason.startswith("train.batch_size"):
            return f"invalid value for train.batch_size: {reason}"
        return f"invalid value for {key}: {quote(value)}; {reason}"
    if kind in ("model_type", "dict_type") and len(loc) == 1:
        return f"invalid section {key}: expected a mapping of keys, got {quote(value)}"
    template = _EXPECTED.get(kind)
    expected = template.format(**error.get("ctx", {})) if template else error["msg"]
    word = "type" if kind.endswith(("_type", "_parsing")) else "value"
    near = _nearest_choice(loc, value) if kind == "literal_error" else None
    return (f"invalid {word} for {key}: {quote(value)}"
            + (f" (did you mean {near!r}?)" if near else "") + f"; expected {expected}")


def _nearest_choice(loc: list[Any], value: Any) -> str | None:
    """The choice of a key with a fixed set of values (data.dataset) nearest to `value`."""
    if len(loc) != 2 or not isinstance(value, str) or loc[0] not in Params.model_fields:
        return None
    field = Params.model_fields[str(loc[0])].annotation.model_fields.get(str(loc[1]))
    choices = [str(choice) for choice in get_args(field.annotation)] if field else []
    near = difflib.get_close_matches(value.lower(), choices, n=1)
    return near[0] if near else None


def _unknown(loc: list[Any]) -> str:
    sections = list(Params.model_fields)
    name = shorten(str(loc[-1]))
    if len(loc) == 1:
        hint = difflib.get_close_matches(name, sections, n=1) if isinstance(loc[0], str) else []
        return (f"unknown section {quote(name)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + "; the sections are: " + ", ".join(sections))
    section = str(loc[0])
    keys = list(Params.model_fields[section].annotation.model_fields)
    hint = difflib.get_close_matches(name, keys, n=1)
    return (f"unknown key {section}.{name}"
            + (f" (did you mean {section}.{hint[0]}?)" if hint else "")
            + f"; the keys of {section} are: " + ", ".join(keys))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `section.key=value` override; the value is YAML (3, true, null, [256])."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(redact_text(f"invalid override {quote(text)}; expected "
                                      "section.key=value, e.g. train.epochs=3"))
    try:
        return key.strip(), _safe_load(value)
    except _AliasFound:
        raise ConfigError(redact_text(f"invalid override {quote(text)}: {_NO_ALIASES}")) from None
    # PyYAML raises ValueError for an impossible date (2024-13-01) and RecursionError for
    # deeply nested brackets: both are a bad value, not a bug.
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(redact_text(f"invalid override {quote(text)}: the value is not "
                                      f"valid YAML ({shorten(str(exc))})")) from exc


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the raw mapping with `section.key` overrides set."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not isinstance(merged.get(section, {}), dict):
            raise ConfigError(f"invalid section {shorten(section)}: expected a mapping")
        merged.setdefault(section, {})[key] = value
    return merged


def read_params_file(path: Path) -> dict[str, Any]:
    """Read params.yaml as a raw mapping; a missing or unparsable file (not UTF-8, not YAML,
    YAML anchors or aliases) is a ConfigError."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"params file not found: {path}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} is not valid UTF-8: byte {exc.start} (0x{data[exc.start]:02x}, "
                          f"line {line}) cannot be decoded; save the file as UTF-8") from None
    try:
        raw = _safe_load(text)
    except _AliasFound as exc:
        raise ConfigError(f"{path} line {exc.line}: {_NO_ALIASES}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(redact_text(f"{path} is not valid YAML: {shorten(str(exc), 400)}")
                          ) from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (data:, model:, train:, ...), "
                          f"got a {type(raw).__name__}")
    return raw


def load_params(path: Path | str = PARAMS_FILE,
                overrides: dict[str, Any] | None = None) -> Params:
    """Load, override and validate params.yaml."""
    raw = read_params_file(Path(path))
    return params_from_dict(apply_overrides(raw, overrides or {}))


def tunable_keys() -> list[str]:
    """Every key a sweep may vary: the train and model keys, less TUNE_FIXED_KEYS."""
    return [f"{section}.{key}" for section in TUNE_SECTIONS
            for key in Params.model_fields[section].annotation.model_fields
            if f"{section}.{key}" not in TUNE_FIXED_KEYS]


def space_entry(key: str, spec: Any) -> tuple[str | None, list[Any]]:
    """A tune.space entry as (distribution, its arguments): (None, [value]) for a fixed value;
    numbers as floats or ints, checked for shape (not yet for the key: check_space does that)."""
    if not isinstance(spec, dict):
        return None, [spec]
    if len(spec) != 1 or next(iter(spec)) not in TUNE_DISTRIBUTIONS:
        name = shorten(str(next(iter(spec), "")))
        near = difflib.get_close_matches(name, TUNE_DISTRIBUTIONS, n=1) if len(spec) == 1 else []
        raise ConfigError(f"invalid tune.space {key}: {quote(spec)}"
                          + (f" (did you mean {near[0]}?)" if near else "")
                          + "; expected one of {" + ": [...]}, {".join(TUNE_DISTRIBUTIONS)
                          + ": [...]} or a fixed value")
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"invalid tune.space {key}: {kind} needs a non-empty list of "
                              f"values, got {quote(args)}")
        return kind, list(args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"invalid tune.space {key}: {kind} needs [low, high], got {quote(args)}")
    try:
        low, high = ((_strict_int(a) for a in args) if kind == "randint"
                     else (_number(a) for a in args))
    except ValueError as exc:
        raise ConfigError(f"invalid tune.space {key}: {kind} {quote(args)}: {exc}") from None
    if not low < high:
        raise ConfigError(f"invalid tune.space {key}: {kind} needs low < high, got {quote(args)}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"invalid tune.space {key}: loguniform needs low > 0, got {quote(args)}")
    return kind, [low, high]


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected integers")
    return value


def space_samples(kind: str | None, args: list[Any]) -> list[Any]:
    """Values that stand for a space entry when its key checks them: every fixed, choice or grid
    value; a range's ends and a value inside it (a whole-number key refuses a continuous
    range there); randint's upper end is excluded, as in Ray Tune."""
    if kind == "randint":
        return [args[0], args[1] - 1]
    if kind == "uniform":
        return [(args[0] + args[1]) / 2 + 0.1 * (args[1] - args[0]), args[0], args[1]]
    if kind == "loguniform":
        return [math.sqrt(args[0] * args[1]) * 1.0001, args[0], args[1]]
    return args


def check_space(params: Params) -> None:
    """tune.space's keys and values, each value checked by its key's own validation;
    ConfigError names the entry."""
    keys = tunable_keys()
    for key, spec in params.tune.space.items():
        section, _, name = key.partition(".")
        if key in TUNE_FIXED_KEYS:
            raise ConfigError(f"tune.space {key}: not a key a trial may vary (where and how "
                              f"trials run is the same for all); set it in {section}:")
        if key not in keys:
            near = difflib.get_close_matches(key, keys, n=1)
            raise ConfigError(f"unknown key tune.space {shorten(key)}"
                              + (f" (did you mean {near[0]}?)" if near else "")
                              + "; a sweep varies train and model keys: " + ", ".join(keys))
        kind, args = space_entry(key, spec)
        for value in space_samples(kind, args):
            base = params.to_dict()
            try:
                Params.model_validate({**base, section: {**base[section], name: value}})
            except ValidationError as exc:
                raise ConfigError(redact_text(f"tune.space {key}: {describe_error(exc)}")
                                  ) from None
    grids = [key for key, spec in params.tune.space.items()
             if isinstance(spec, dict) and "grid" in spec]
    if grids and params.tune.search != "random":
        raise ConfigError(f"tune.space {grids[0]}: grid needs tune.search: random (Ray Tune's "
                          f"{params.tune.search} search samples; use choice)")


def check_schedule(params: Params) -> None:
    """The scheduler against the trials' epochs. Checked by the sweep only: the space leaves
    train.epochs to train:, which a run of any other command may set lower (`dltrain train
    -S train.epochs=1`) without a sweep in sight."""
    if params.tune.space and params.tune.scheduler == "asha":
        most = max(trial_epochs(params))
        if params.tune.grace_period >= most:
            raise ConfigError(f"tune.grace_period {params.tune.grace_period} is not below the "
                              f"trials' epochs ({most}): ASHA could stop no trial early; lower "
                              "it, or set tune.scheduler: fifo")


def trial_epochs(params: Params) -> list[int]:
    """The epoch counts a trial of the sweep can have: train.epochs, or its space values."""
    spec = params.tune.space.get("train.epochs")
    if spec is None:
        return [params.train.epochs]
    kind, args = space_entry("train.epochs", spec)
    return list(range(args[0], args[1])) if kind == "randint" else [int(v) for v in args]
