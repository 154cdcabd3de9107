"""The register stage: complete the training's MLflow run (dltrain.registry.runlog), register the
model and move its aliases.

What it registers must be what evaluate measured: reports/metrics.json carries the sha256 of the
weights and of the test split it scored, and the stage refuses metrics of another model (a
skipped evaluate) or of other test data.

The gate (aliases, not the deprecated stages; dltrain.registry.gate has the rule):
- below register.min_accuracy: not registered (the run is still logged, for the record);
- the same weights already registered (weights_sha256 tag): no new version, but a promotion
  that an earlier run left unfinished is finished;
- else a new version, compared with the champion on the same test data: when the champion was
  evaluated on another test set, its weights are fetched from the registry and scored on the
  current one with evaluate's own code. Both scores and the test checksum are recorded on the
  version (tags) and in reports/registration.json. A champion that cannot be scored stops the
  stage before anything is registered, unless `--if-champion-unloadable promote` asks for an
  explicit, recorded promotion.
Aliases move under dltrain.registry.promotion's lock (SQLite) or reconciliation (a server),
and every move is recorded in the registry's alias history (`dltrain registry history`).

Inside a DVC experiment (`dvc exp run`: DVC names it in the stage's environment) the stage
registers nothing: an experiment is a question, not a release. It completes the MLflow run,
tagged with the experiment's name so experiments compare in the MLflow UI, and writes
registration.json with `registered: false`; the model reaches the registry only from a run
on the workspace, once the experiment is applied there.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dltrain.atomic import is_disk_full, read_json, write_json
from dltrain.config import Params, shorten
from dltrain.errors import DataError, DiskFullError, ModelError, RegistryError
from dltrain.evaluate.stage import matches, score_model, split_checksum
from dltrain.model.weights import load_weights_and_digest
from dltrain.paths import Workspace, dvc_experiment
from dltrain.registry import promotion
from dltrain.registry.candidate import TUNE_SWEEP_TAG, TUNE_TRIAL_TAG, Candidate
from dltrain.registry.gate import CHAMPION, EPS, Member, Score
from dltrain.registry.mlflow_model import link_version, run_model
from dltrain.registry.runlog import log_run
from dltrain.registry.verify import fetch_checked
from dltrain.tracking.runs import EXPERIMENT_TAG
from dltrain.tracking.store import (
    connect,
    display_uri,
    mlflow_logs_to,
    redact,
    resolve_tracking_uri,
)

UNLOADABLE_CHOICES = ("fail", "promote")


def read_candidate(ws: Workspace) -> Candidate:
    """The model (checked to be plain weights of the right shapes), its card and reports; the
    metrics must be evaluate's measurement of these weights on the current test split.

    The weights are read without torch (dltrain.model.weights): checking them needs none of it,
    and its import would be most of this stage's start-up."""
    _weights, card, weights_sha256 = load_weights_and_digest(ws.model_path, ws.model_card_path)
    if not ws.metrics_path.is_file():
        raise DataError(f"{ws.metrics_path} not found (run `dltrain evaluate` first)")
    metrics = read_json(ws.metrics_path)
    missing = [k for k in ("accuracy", "weights_sha256", "test_sha256") if k not in metrics]
    if missing:
        raise DataError(f"{ws.metrics_path} has no {', '.join(missing)} (written by an older "
                        "evaluate): re-run `dltrain evaluate`")
    if not matches(metrics["weights_sha256"], weights_sha256):
        raise DataError(f"{ws.metrics_path} is stale: it measured weights "
                        f"{str(metrics['weights_sha256'])[:12]}, but {ws.model_path} holds "
                        f"{weights_sha256[:12]}; re-run `dltrain evaluate` (or `dvc repro`)")
    summary_path = ws.summary_path
    if not summary_path.is_file():
        raise DataError(f"{summary_path} not found (run `dltrain preprocess` first)")
    current = split_checksum(ws.processed_dir, read_json(summary_path))
    if not matches(metrics["test_sha256"], current):
        raise DataError(f"{ws.metrics_path} is stale: it measured test split "
                        f"{str(metrics['test_sha256'])[:12]}, but {ws.processed_dir} holds "
                        f"{current[:12]}; re-run `dltrain evaluate` (or `dvc repro`)")
    training = read_json(ws.training_report_path) if ws.training_report_path.is_file() else {}
    # A diverged model (NaN or infinite loss) is not a model, whatever min_accuracy says.
    for source, figures in ((ws.metrics_path, metrics), (ws.model_card_path, card.get("final")),
                            (ws.training_report_path, training.get("epochs"))):
        where = _non_finite(figures)
        if where:
            raise DataError(f"{source} has a non-finite figure ({where}): the training "
                            "diverged, so it is not registered whatever register.min_accuracy "
                            "says; lower train.learning_rate and re-run `dvc repro`")
    # metrics.json keeps short checksums: the candidate carries the full ones just checked.
    metrics = {**metrics, "weights_sha256": weights_sha256, "test_sha256": current,
               "per_class": _per_class(ws, weights_sha256, current)}
    return Candidate(card, metrics, training, weights_sha256)


def _non_finite(value: Any, at: str = "") -> str | None:
    """Where in `value` (a JSON document) the first NaN or infinity is, as `epochs[2].val_loss
    = nan`; None when there is none."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{at or 'value'} = {value}"
    if isinstance(value, dict):
        items = ((f"{at}.{k}" if at else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{at}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for key, v in items if (found := _non_finite(v, key))), None)


def _per_class(ws: Workspace, weights_sha256: str, test_sha256: str) -> list[dict[str, Any]]:
    """The per-class rows of reports/per_class.json, checked to be of the same evaluation."""
    path = ws.reports.per_class
    if not path.is_file():
        raise DataError(f"{path} not found (written by evaluate since the per-class figures "
                        "left metrics.json): re-run `dltrain evaluate`")
    report = read_json(path)
    if not isinstance(report, dict) or (report.get("weights_sha256"), report.get(
            "test_sha256")) != (weights_sha256, test_sha256):
        raise DataError(f"{path} is stale: it is not the evaluation of {ws.model_path} on "
                        f"{ws.processed_dir}; re-run `dltrain evaluate` (or `dvc repro`)")
    return list(report.get("classes") or [])


class ChampionScorer:
    """Scores of registered versions on the candidate's test set: the recorded one when the
    version was evaluated on it, else measured now on its weights from the registry with
    evaluate's code (cached: a version is downloaded at most once)."""

    def __init__(self, client: Any, name: str, tracking_uri: str, ws: Workspace,
                 batch_size: int, test_sha256: str) -> None:
        self.client, self.name, self.tracking_uri = client, name, tracking_uri
        self.ws, self.batch_size, self.test_sha256 = ws, batch_size, test_sha256
        self._cache: dict[int, Score] = {}

    def __call__(self, champion: int, member: Member) -> Score:
        """The gate's callback: `champion`'s score on `member`'s test set."""
        if member.test_sha256 != self.test_sha256:
            return Score(champion, None, error=f"its score on version {member.version}'s test "
                                               "set is not recorded, and this workspace holds "
                                               "other test data")
        return self.version(champion)

    def version(self, number: int) -> Score:
        if number not in self._cache:
            self._cache[number] = self._score(number)
        return self._cache[number]

    def _score(self, number: int) -> Score:
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version(self.name, str(number))
        except MlflowException as exc:
            if promotion.error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            return Score(number, None, error=f"version {number} no longer exists")
        own = version.tags.get("test_accuracy")
        own_accuracy = None if own is None else float(own)
        if version.tags.get("test_sha256") == self.test_sha256:
            return Score(number, own_accuracy, own_accuracy=own_accuracy)
        try:
            with tempfile.TemporaryDirectory(prefix="dltrain-champion-") as tmp:
                # Checked as predict checks a version, against the registry's own checksum.
                checked = fetch_checked(version, self.tracking_uri, Path(tmp))
                metrics = score_model(checked.weights, self.ws.processed_dir,
                                      batch_size=self.batch_size)
        except (ModelError, OSError) as exc:
            return Score(number, None, True, own_accuracy, error=str(exc))
        return Score(number, float(metrics["accuracy"]), True, own_accuracy)


def _same_weights(client: Any, name: str, weights_sha256: str) -> int | None:
    same = promotion.list_versions(client, name, f" and tags.weights_sha256 = '{weights_sha256}'")
    return min((int(v.version) for v in same), default=None)


def _unloadable(name: str, base: Score) -> ModelError:
    return ModelError(
        f"champion version {base.version} of {name} cannot be scored on the current test set "
        f"({base.error}); nothing was registered. Restore its files, roll back to another "
        "version (`dltrain registry rollback --to VERSION`), or replace it anyway, recorded in "
        "the alias history: `dltrain register --if-champion-unloadable promote`")


def _register(client: Any, tracking_uri: str, ws: Workspace, params: Params, cand: Candidate,
              *, serialised: bool, promote_unloadable: bool) -> dict[str, Any]:
    cfg = params.register
    name = cfg.model_name
    scorer = ChampionScorer(client, name, tracking_uri, ws, params.evaluate.batch_size,
                            cand.test_sha256)
    outcome: dict[str, Any] = {
        "model_name": name, "version": None, "aliases": [], "registered": False,
        "new_version": False, "run_id": None, "tracking_uri": display_uri(tracking_uri),
        "test_accuracy": cand.accuracy, "test_sha256": cand.test_sha256,
        "weights_sha256": cand.weights_sha256, "previous_champion_version": None,
        "champion_version": None, "champion_accuracy": None, "champion_rescored": False,
        "history": [],
    }
    experiment = dvc_experiment()
    if experiment is not None:
        return _log_experiment(client, tracking_uri, ws, params, cand, outcome, experiment)
    tune_tags, outcome["tune_note"] = cand.tune_tags(params.tune.applied)
    outcome["tune"] = ({"sweep": tune_tags[TUNE_SWEEP_TAG], "trial": tune_tags[TUNE_TRIAL_TAG]}
                       if tune_tags else None)
    model = promotion.registered_model(client, name)
    existing = _same_weights(client, name, cand.weights_sha256) if model is not None else None
    versions = promotion.list_versions(client, name) if model is not None else []
    anchor = promotion.read_anchor(model, versions)
    outcome["previous_champion_version"] = anchor.champion

    if existing is not None:
        for key, value in tune_tags.items():  # the same weights, now known to be a sweep's
            client.set_model_version_tag(name, str(existing), key, value)
        return _finish_existing(client, name, cand, scorer, outcome, existing,
                                serialised=serialised)
    return _register_new(client, tracking_uri, ws, params, cand, scorer, outcome, anchor,
                         tune_tags, serialised=serialised, promote_unloadable=promote_unloadable)


def _log_experiment(client: Any, tracking_uri: str, ws: Workspace, params: Params,
                    cand: Candidate, outcome: dict[str, Any], experiment: str
                    ) -> dict[str, Any]:
    """A DVC experiment's model: its MLflow run completed and tagged with the experiment, and
    nothing read from or written to the registry (no version, no alias, no champion scored)."""
    run_id = log_run(client, tracking_uri, ws, params, cand, params.register.model_name)
    client.set_tag(run_id, EXPERIMENT_TAG, experiment)
    client.set_tag(run_id, "dltrain.registered", "false")
    return {**outcome, "run_id": run_id, "experiment": experiment,
            "reason": f"experiment {experiment}: not registered"}


def _finish_existing(client: Any, name: str, cand: Candidate, scorer: ChampionScorer,
                     outcome: dict[str, Any], existing: int, *, serialised: bool
                     ) -> dict[str, Any]:
    """The same weights are registered already: no new version, but settling finishes a
    promotion that a run interrupted after creating the version."""
    resolution, moved = promotion.settle(client, name, scorer, own=existing,
                                         serialised=serialised)
    step = resolution.step_for(existing)
    reason = (f"the same weights (sha256 {cand.weights_sha256[:12]}) are already version "
              f"{existing}: no new version")
    if step is not None:
        reason += f"; the gate made it {step.alias or 'no alias'}: {step.reason}"
    current = client.get_model_version(name, str(existing))
    return {**outcome, **_scores(step.champion if step else None),
            "version": existing, "aliases": resolution.aliases_of(existing),
            "registered": True, "run_id": current.run_id, "reason": reason,
            "champion_version": resolution.champion, "history": [asdict(e) for e in moved]}


def _register_new(client: Any, tracking_uri: str, ws: Workspace, params: Params,
                  cand: Candidate, scorer: ChampionScorer, outcome: dict[str, Any],
                  anchor: promotion.Anchor, tune_tags: dict[str, str], *, serialised: bool,
                  promote_unloadable: bool) -> dict[str, Any]:
    """Score the champion on the candidate's test set, log the run, create the version with
    the gate's inputs (and the sweep it was tuned by) as tags, and settle the aliases."""
    cfg = params.register
    name = cfg.model_name
    base = scorer.version(anchor.champion) if anchor.champion is not None else None
    if base is not None and base.accuracy is None and not promote_unloadable:
        raise _unloadable(name, base)
    outcome.update(_scores(base), champion_version=anchor.champion)
    run_id = log_run(client, tracking_uri, ws, params, cand, name)
    outcome["run_id"] = run_id
    if cand.accuracy + EPS < cfg.min_accuracy:
        client.set_tag(run_id, "dltrain.registered", "false")
        return {**outcome, "reason": f"test accuracy {cand.accuracy:.4f} is below "
                                     f"register.min_accuracy {cfg.min_accuracy}: not registered"}

    promotion.ensure_registered_model(client, name)
    tags = {**cand.tags(), **promotion.gate_tags(base, cfg.min_improvement, promote_unloadable),
            **tune_tags}
    # The version is the MLflow model that log_run logged into the run (its artifact location:
    # a `models:/<model_id>` source would be resolved against the process's default store).
    logged = run_model(client, run_id, cand.weights_sha256)
    if logged is None:
        raise RegistryError(f"run {run_id} holds no MLflow model of weights "
                            f"{cand.weights_sha256[:12]}: it was not logged; re-run register")
    version = client.create_model_version(
        name, logged.artifact_location, run_id=run_id, model_id=logged.model_id, tags=tags,
        description=f"test accuracy {cand.accuracy:.4f} on {tags.get('dataset')}")
    number = int(version.version)
    link_version(client, logged, name, number)
    client.set_tag(run_id, "dltrain.registered", "true")
    resolution, moved = promotion.settle(client, name, scorer, own=number, serialised=serialised)
    step = resolution.step_for(number)
    # No step: a registration running at the same time (against a server) settled it first.
    reason = step.reason if step else "gated by a registration that ran at the same time"
    if step is not None and step.alias == CHAMPION and resolution.champion != number:
        reason += f"; since displaced by version {resolution.champion}"
    return {**outcome, **_scores(step.champion if step else base), "version": number,
            "aliases": resolution.aliases_of(number), "registered": True, "new_version": True,
            "reason": reason, "champion_version": resolution.champion,
            "history": [asdict(e) for e in moved]}


def _cause(exc: BaseException) -> str:
    """The first line of the innermost cause of `exc`: an MLflow error on a SQL store wraps
    SQLAlchemy's, whose text runs to the statement and its parameters; the cause at the
    bottom (`OperationalError: database or disk is full`) is what a user can act on."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # 500: room for an HTTP error's URL and, after it, its status.
    return shorten(f"{type(root).__name__}: {text}" if root is not exc else text or
                   type(exc).__name__, 500)


def _details(log: Path, logged: bool) -> str:
    return f" (MLflow's own report: {log})" if logged else ""


def _scores(champion: Score | None) -> dict[str, Any]:
    """The champion's score that the gate compared with, for registration.json."""
    if champion is None:
        return {"champion_accuracy": None, "champion_rescored": False}
    return {"champion_accuracy": champion.accuracy, "champion_rescored": champion.rescored}


def register(ws: Workspace, params: Params, *, attempts: int = 4, backoff_s: float = 1.0,
             if_champion_unloadable: str = "fail") -> dict[str, Any]:
    """Log the run, register the model and move the aliases; write reports/registration.json.

    An unreachable tracking server is retried `attempts` times with exponential backoff from
    `backoff_s`, then RegistryError; registration.json is then not written, so a later
    `dvc repro` runs this stage again. Any other error of the registry fails the stage too.
    """
    if if_champion_unloadable not in UNLOADABLE_CHOICES:
        raise ValueError(f"if_champion_unloadable must be one of {UNLOADABLE_CHOICES}")
    cand = read_candidate(ws)
    tracking_uri = resolve_tracking_uri(params.register.tracking_uri, ws.root)
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    log = ws.register_log_path
    with mlflow_logs_to(log) as logged, \
            promotion.serialised(tracking_uri, params.register.model_name) as serialised:
        client = connect(tracking_uri, attempts=attempts, backoff_s=backoff_s)
        try:
            outcome = _register(client, tracking_uri, ws, params, cand, serialised=serialised,
                                promote_unloadable=if_champion_unloadable == "promote")
        except (MlflowException, RequestException) as exc:
            raise RegistryError(
                f"MLflow at {display_uri(tracking_uri)} failed during registration: "
                f"{redact(_cause(exc), tracking_uri)}{_details(log, logged())}. The model "
                "stays in models/; re-run `dltrain register` (or `dvc repro`) once the store "
                "is reachable and has room: it finishes what this run left undone.") from exc
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            # MLflow writing the run's artifacts into the store (a local artifact folder).
            raise DiskFullError(
                f"no space left while MLflow at {display_uri(tracking_uri)} stored the "
                f"registration ({exc.strerror}){_details(log, logged())}. The model stays in "
                "models/; free some space where the store keeps its artifacts and re-run "
                "`dltrain register`: it finishes what this run left undone.") from exc
    write_json(ws.registration_path, outcome)
    if outcome.get("experiment"):
        name = outcome["experiment"]
        print(f"register: experiment {name}: test accuracy {cand.accuracy:.4f}, logged to "
              f"MLflow run {outcome['run_id']}, not registered. To register it: "
              f"`dvc exp apply {name}`, then `dvc repro -f -s register` (or `dltrain register`) "
              "in the workspace")
        return outcome
    where = (f"version {outcome['version']} ({', '.join(outcome['aliases']) or 'no alias'})"
             if outcome["version"] else "not registered")
    print(f"register: {outcome['model_name']} {where}: {outcome['reason']}")
    if outcome.get("tune") and outcome["version"]:
        print(f"register: tuned by sweep {outcome['tune']['sweep']} (trial "
              f"{outcome['tune']['trial']}): tagged {TUNE_SWEEP_TAG}")
    elif outcome.get("tune_note"):
        print(f"register: {outcome['tune_note']}")
    return outcome
