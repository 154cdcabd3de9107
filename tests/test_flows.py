"""The mnist-training flow (flows/): its pieces, each task alone, and the whole flow under
Prefect's test harness, on tiny synthetic data through real DVC, Ray and MLflow."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dltrain.config import apply_overrides, params_from_dict, read_params_file
from dltrain.errors import ConfigError
from flows import mnist_training as mt
from flows.mnist_training import StageFailedError, changed_stages, run_stage
from flows.summary import headline, mlflow_links, run_summary
from flows.workspace import (
    WorkspaceBusyError,
    params_journal_path,
    params_overridden,
    render_overrides,
    workspace_lock,
)

from helpers.data import write_raw_dir
from helpers.prefect import run_artifact
from helpers.repo import REPO_ROOT, make_clone

LOG = logging.getLogger("test_flows")
# Local mode: the flow's stage logic is what these tests check, not Ray's start and stop.
TINY_TRAIN = {"train.epochs": 1, "train.num_workers": 0}


def dvc_lock(clone: Path) -> dict:
    return yaml.safe_load((clone / "dvc.lock").read_text())


def dvc_lock_text(clone: Path) -> str | None:
    """dvc.lock as it is (a clone may carry one from the working tree), None if absent."""
    path = clone / "dvc.lock"
    return path.read_text() if path.exists() else None


# --- the stage list and the stage's output ----------------------------------------------

def test_stages_are_dvc_yaml_stages_in_order():
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert mt.STAGES == list(dvc_yaml) == ["check", "download", "preprocess", "train",
                                           "evaluate", "register"]
    assert {name: t.name for name, t in mt.TASKS.items()} == {s: s for s in mt.STAGES}
    # The check runs on every repro: dvc.yaml says so, and the flow does not ask DVC first.
    assert mt.ALWAYS_RUNS == {name for name, stage in dvc_yaml.items()
                              if stage.get("always_changed")} == {"check"}


def test_only_the_stages_that_reach_the_source_retry_and_every_task_has_a_timeout():
    assert mt.TASKS["check"].retries == mt.TASKS["download"].retries == 3
    assert [mt.TASKS[s].retries for s in mt.STAGES[2:]] == [0, 0, 0, 0]
    assert all(mt.TASKS[s].timeout_seconds > 0 for s in mt.STAGES)
    # training is the long stage
    assert mt.TASKS["train"].timeout_seconds > mt.TASKS["preprocess"].timeout_seconds


# A stand-in for dvc: a progress bar that rewrites its line, the stage's own error line, then
# DVC's last word, and a non-zero exit.
FAKE_DVC = """#!/bin/sh
printf 'start\\nepoch 1:  10%%\\repoch 1: 100%%\\n'
echo 'To track the changes with git, run:' >&2
echo 'dltrain train: error: no data' >&2
echo 'ERROR: failed to reproduce train' >&2
exit 3
"""


def test_one_stage_streams_its_output_line_by_line_and_names_its_cause(tmp_path, caplog):
    (tmp_path / "dvc").write_text(FAKE_DVC)
    (tmp_path / "dvc").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    with caplog.at_level(logging.INFO, logger="dltrain.flows"):
        code, cause = mt.run_command(["dvc", "repro"], tmp_path, env)
    assert (code, cause) == (3, "dltrain train: error: no data")
    logged = [r.getMessage() for r in caplog.records][1:]  # after the `$ dvc ...` line
    assert logged == ["start", "epoch 1: 100%", "dltrain train: error: no data",
                      "ERROR: failed to reproduce train"]  # one line per bar, no hints


# --- a stage never outlives its task, nor the flow run's process group -------------------

# A stand-in for `dvc repro train`: it starts a "Ray worker" in a session of its own (out of
# reach of a group signal, as Ray's are), records both pids, and on SIGINT notes it and exits
# (or, stubborn, ignores SIGINT).
STAGE_SCRIPT = """\
import os, signal, subprocess, sys, time
out, stubborn = sys.argv[1], sys.argv[2] == "stubborn"
# The worker takes SIGINT as Python's default does, also when this test runs with SIGINT
# ignored (a background job of a non-interactive shell inherits it ignored).
worker = subprocess.Popen([sys.executable, "-c", "import signal, sys, time; "
                           "signal.signal(signal.SIGINT, signal.default_int_handler); "
                           "open(sys.argv[1], 'w').close(); time.sleep(600)",
                           os.path.join(out, "worker-ready")], start_new_session=True)
# The pids are written once the worker takes SIGINT: before that, a worker started with SIGINT
# ignored would ignore the test's SIGINT too, and live until SIGKILL.
while not os.path.exists(os.path.join(out, "worker-ready")):
    time.sleep(0.01)
def on_sigint(*_):
    open(os.path.join(out, "sigint"), "w").write(str(time.monotonic()))
    sys.exit(130)
signal.signal(signal.SIGINT, signal.SIG_IGN if stubborn else on_sigint)
open(os.path.join(out, "pids.tmp"), "w").write(f"{os.getpid()} {worker.pid}")
os.replace(os.path.join(out, "pids.tmp"), os.path.join(out, "pids"))
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_until(check, timeout_s: float) -> float:
    """Seconds until `check()` held; fails after `timeout_s`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - start


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("stubborn", [False, True], ids=["stops-on-sigint", "ignores-sigint"])
def test_a_stopped_stage_takes_its_workers_with_it(tmp_path, stubborn, monkeypatch):
    """What a timeout, a cancellation or the flow run's exit does to a running stage: SIGINT
    to it and every process under it (also a worker in a session of its own), SIGKILL after
    the grace period for one that ignores SIGINT."""
    monkeypatch.setattr(mt, "GRACE_S", 3.0 if stubborn else 120.0)
    stage = tmp_path / "stage.py"
    stage.write_text(STAGE_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(stage), str(tmp_path),
                             "stubborn" if stubborn else "polite"])
    pids = [proc.pid]
    try:
        _wait_until((tmp_path / "pids").exists, 30)
        pids = list(map(int, (tmp_path / "pids").read_text().split()))
        start = time.monotonic()
        mt._stop(proc)
        took = time.monotonic() - start
        assert all(_gone(p) for p in pids)
    finally:
        _kill_all(pids)
    assert (tmp_path / "sigint").exists() != stubborn
    # Polite: SIGINT ended it, inside a grace period long enough that a loaded host cannot
    # stretch the exit past it (30 s was not, at a load average of 20 on 2 cores); stubborn:
    # SIGKILL, only once the grace period was over.
    assert took < mt.GRACE_S if not stubborn else took >= mt.GRACE_S


# A stand-in for the flow-run process: its own session (as Prefect starts a flow run), the
# stage started as the flow's tasks start it.
PARENT_SCRIPT = """\
import os, subprocess, sys
from pathlib import Path
from flows import mnist_training as mt
out = Path(sys.argv[2])
(out / "dvc").write_text(f"#!/bin/sh\\nexec {sys.executable} {sys.argv[1]} {out} polite\\n")
(out / "dvc").chmod(0o755)
mt.run_command(["dvc", "repro"], out, {**os.environ, "PATH": f"{out}:{os.environ['PATH']}"})
"""


def test_a_sigkill_of_the_flow_runs_process_group_stops_the_stage(tmp_path):
    stage = tmp_path / "stage.py"
    stage.write_text(STAGE_SCRIPT)
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, str(stage), str(tmp_path)],
                              cwd=REPO_ROOT, start_new_session=True)
    pids: list[int] = []
    try:
        _wait_until((tmp_path / "pids").exists, 60)
        pids = list(map(int, (tmp_path / "pids").read_text().split()))
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
        _wait_until(lambda: _gone(pids[0]), 10)  # the stage; Ray's workers follow their raylet
    finally:
        _kill_all(pids)


# --- params for one run ------------------------------------------------------------------

PARAMS_TEXT = """\
# a comment that must survive
data:
  dataset: fashion-mnist   # fashion-mnist | mnist
  source: null
train:
  epochs: 5                # the seed's
  num_workers: 2
"""


def test_render_overrides_keeps_comments_and_sets_values():
    out = render_overrides(PARAMS_TEXT, {"train.epochs": 1, "data.source": "file:///x",
                                         "evaluate.batch_size": 10})
    assert "# a comment that must survive" in out
    assert "# the seed's" in out and "# fashion-mnist | mnist" in out
    assert yaml.safe_load(out) == {
        "data": {"dataset": "fashion-mnist", "source": "file:///x"},
        "train": {"epochs": 1, "num_workers": 2}, "evaluate": {"batch_size": 10}}


def test_params_overridden_restores_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    with params_overridden(path, {"train.epochs": 1}):
        assert yaml.safe_load(path.read_text())["train"]["epochs"] == 1
    assert path.read_text() == PARAMS_TEXT


def test_params_overridden_keeps_an_edit_made_during_the_run(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    with params_overridden(path, {"train.epochs": 1}):
        path.write_text(PARAMS_TEXT.replace("epochs: 5", "epochs: 7"))
    assert "epochs: 7" in path.read_text()


# A run that is SIGKILLed while its overrides are in params.yaml: no `finally` runs.
KILLED_RUN = """\
import sys, time
from pathlib import Path
from flows.workspace import params_overridden
with params_overridden(Path(sys.argv[1]), {"train.epochs": 1}):
    print("overridden", flush=True)
    time.sleep(600)
"""


def _killed_mid_run(path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(path)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "overridden"
    finally:
        proc.kill()
        proc.wait()
    assert "epochs: 1" in path.read_text()  # left behind by the killed run


@pytest.mark.parametrize("next_overrides", [{}, {"train.epochs": 1}])
def test_the_next_run_puts_back_params_a_killed_run_left_overridden(tmp_path, next_overrides):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    _killed_mid_run(path)
    with params_overridden(path, next_overrides, LOG):
        assert ("epochs: 1" in path.read_text()) == bool(next_overrides)
    assert path.read_text() == PARAMS_TEXT
    assert not params_journal_path(path).exists()


def test_an_edit_after_a_killed_run_is_kept(tmp_path, caplog):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    _killed_mid_run(path)
    path.write_text(PARAMS_TEXT.replace("epochs: 5", "epochs: 7"))
    with caplog.at_level(logging.WARNING), params_overridden(path, {}, LOG):
        pass
    assert "epochs: 7" in path.read_text()
    assert "edited since; leaving it" in caplog.text
    assert not params_journal_path(path).exists()


@pytest.mark.parametrize("overrides, message", [
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.epochs": "many"}, "train.epochs"),
    ({"data.dataset": "cifar"}, "data.dataset"),
    ({"train.nope": 1}, "unknown key train.nope"),
    ({"epochs": 1}, "unknown section 'epochs'"),
])
def test_a_bad_override_names_the_key(overrides, message):
    """What the flow checks before any stage: params.yaml and the run's overrides, through
    the typed config."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        params_from_dict(apply_overrides(read_params_file(REPO_ROOT / "params.yaml"), overrides))


def test_run_overrides_maps_named_parameters(monkeypatch):
    named = {"dataset": "mnist", "epochs": 2, "num_workers": None, "use_gpu": False,
             "ray_address": None}
    assert mt.run_overrides(named, {"data.seed": 1}) == {
        "data.seed": 1, "data.dataset": "mnist", "train.epochs": 2, "train.use_gpu": False}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert mt.run_overrides({"ray_address": "env"}, None) == {
        "train.ray_address": "10.0.0.1:6379"}
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ConfigError, match="RAY_ADDRESS is not set"):
        mt.run_overrides({"ray_address": "env"}, None)


def test_resolve_workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("DLTRAIN_WORKSPACE", raising=False)
    assert mt.resolve_workspace(None).root == REPO_ROOT
    monkeypatch.setenv("DLTRAIN_WORKSPACE", str(tmp_path))
    with pytest.raises(ConfigError, match="has no dvc.yaml"):
        mt.resolve_workspace(None)


# --- the workspace lock ------------------------------------------------------------------

def test_second_holder_fails_fast_naming_the_first(tmp_path):
    with workspace_lock(tmp_path, "flow run 1234 (brave-fox)"):
        # Another process, as a second flow run would be.
        code = ("import sys; from pathlib import Path; from flows.workspace import "
                "workspace_lock\nwith workspace_lock(Path(sys.argv[1]), 'second'): pass")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
        assert proc.returncode != 0
        assert "WorkspaceBusyError" in proc.stderr
        assert "in use by another pipeline run (flow run 1234 (brave-fox), pid" in proc.stderr
    with workspace_lock(tmp_path, "third"):  # released: the next run gets it
        pass


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with workspace_lock(tmp_path, "first"), pytest.raises(WorkspaceBusyError, match="first"):
        with workspace_lock(tmp_path, "second"):
            pass


# --- the run summary ---------------------------------------------------------------------

SKIPPED = {"check": "ran", **{s: "skipped" for s in mt.STAGES[1:]}}


@pytest.mark.parametrize("outcomes, line", [
    (SKIPPED, "**skipped: data unchanged**"),
    ({s: "ran" for s in mt.STAGES}, "**retrained: the data changed**"),
    ({**SKIPPED, "preprocess": "ran", "train": "ran"}, "**retrained: preprocess's code or params"),
    ({**SKIPPED, "train": "ran", "evaluate": "ran"}, "**retrained: train's code or params changed"),
    ({**SKIPPED, "train": "restored"}, "**ran: train's code or params changed"),
    ({**SKIPPED, "evaluate": "ran"}, "**ran: evaluate's code or params changed**"),
])
def test_the_headline_says_what_the_run_did(outcomes, line):
    assert headline(outcomes).startswith(line)


def test_summary_of_a_skipped_run_registers_nothing(tmp_path):
    from dltrain.atomic import write_json
    from dltrain.paths import Workspace

    ws = Workspace.at(tmp_path)
    write_json(ws.registration_path, {"model_name": "mnist-mlp", "version": 3,
                                      "aliases": ["champion"], "registered": True,
                                      "new_version": True})
    md = run_summary(ws, SKIPPED)
    assert md.index("**skipped: data unchanged**") < md.index("## Stages")
    assert "| check | ran |" in md and "| register | skipped |" in md
    assert "- nothing registered in this run; the last registration:" in md
    assert "version **3**" in md


def test_summary_tolerates_missing_reports(tmp_path):
    from dltrain.paths import Workspace

    md = run_summary(Workspace.at(tmp_path), {"download": "ran"})
    assert "| download | ran |" in md
    for section in ("## Data", "## Training", "## Test metrics", "## Registry"):
        assert section in md


def test_summary_from_reports(tmp_path):
    from dltrain.atomic import write_json
    from dltrain.paths import Workspace

    ws = Workspace.at(tmp_path)
    write_json(ws.processed_dir / "summary.json",
               {"dataset": "mnist", "data_checksum": "abc123", "train": {"n": 540}})
    write_json(ws.training_report_path, {"world_size": 2, "samples_per_s": 1234.5, "epochs": [
        {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4,
         "val_accuracy": 0.85, "epoch_time_s": 1.25}]})
    write_json(ws.metrics_path, {"accuracy": 0.9, "loss": 0.3})
    write_json(ws.registration_path, {"model_name": "mnist-mlp", "version": 3,
                                      "aliases": ["champion"], "registered": True,
                                      "new_version": True})
    md = run_summary(ws, {})
    assert "data set: **mnist**" in md and "`abc123`" in md and "train: 540 samples" in md
    assert "| 1 | 0.5000 | 0.8000 | 0.4000 | 0.8500 | 1.25 |" in md
    assert "- accuracy: 0.9000" in md
    assert "registered a new version: **mnist-mlp** version **3**, aliases: champion" in md


def test_the_summary_embeds_the_curves_png_so_the_ui_shows_them_offline(tmp_path):
    import base64

    from dltrain.atomic import write_json
    from dltrain.evaluate.plots import plot_training_curves
    from dltrain.paths import Workspace

    ws = Workspace.at(tmp_path)
    epochs = [{"epoch": e, "train_loss": 1 / e, "train_accuracy": 1 - 0.1 / e,
               "val_loss": 1.1 / e, "val_accuracy": 1 - 0.12 / e, "epoch_time_s": 1.0}
              for e in (1, 2, 3)]
    write_json(ws.training_report_path, {"epochs": epochs})
    assert "data:image/png" not in run_summary(ws, {})  # no PNG yet: nothing to show
    plot_training_curves(epochs, ws.reports_dir / "training_curves.png")
    md = run_summary(ws, {})
    embedded = md.split("(data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(embedded) == (ws.reports_dir / "training_curves.png").read_bytes()
    # Too large to embed (or not a PNG): named by its path instead.
    (ws.reports_dir / "training_curves.png").write_bytes(b"\x89PNG" + b"\0" * 300_000)
    md = run_summary(ws, {})
    assert "data:image/png" not in md and "Training curves: `reports/training_curves.png`" in md


REG = {"model_name": "mnist mlp", "version": 2, "run_id": "0123abcd"}


@pytest.mark.parametrize("registration, uri, port, run, version", [
    # A tracking server: its own UI, credentials, query and fragment dropped.
    ({**REG, "tracking_uri": "https://alice:s3cret@mlflow.example:8443/base/?t=x#f"}, None,
     None, "https://mlflow.example:8443/base/#/runs/0123abcd",
     "https://mlflow.example:8443/base/#/models/mnist%20mlp/versions/2"),
    (REG, "http://mlflow:5000/", None, "http://mlflow:5000/#/runs/0123abcd",
     "http://mlflow:5000/#/models/mnist%20mlp/versions/2"),
    # The embedded store: where `make mlflow-ui` serves it, on MLFLOW_PORT.
    ({**REG, "tracking_uri": "sqlite:////w/mlruns/mlflow.db"}, "http://ignored:1", None,
     "http://127.0.0.1:5000/#/runs/0123abcd",
     "http://127.0.0.1:5000/#/models/mnist%20mlp/versions/2"),
    ({**REG, "tracking_uri": "sqlite:////w/mlruns/mlflow.db"}, None, "5123",
     "http://127.0.0.1:5123/#/runs/0123abcd",
     "http://127.0.0.1:5123/#/models/mnist%20mlp/versions/2"),
    # Trained and tracked but not registered: the run only.
    ({**REG, "version": None, "tracking_uri": "sqlite:///x.db"}, None, None,
     "http://127.0.0.1:5000/#/runs/0123abcd", None),
    ({"model_name": "m", "version": None, "run_id": None}, "http://mlflow:5000", None, None,
     None),
    (None, "http://mlflow:5000", None, None, None),
])
def test_mlflow_links(monkeypatch, registration, uri, port, run, version):
    if port:
        monkeypatch.setenv("MLFLOW_PORT", port)
    else:
        monkeypatch.delenv("MLFLOW_PORT", raising=False)
    links = mlflow_links(registration, uri)
    assert links == (run, version)
    assert "s3cret" not in str(links) and "alice" not in str(links)


def test_the_summary_links_the_run_and_the_version(tmp_path,
                                                                             monkeypatch):
    from dltrain.atomic import write_json
    from dltrain.paths import Workspace
    from dltrain.tracking.store import embedded_tracking_uri

    monkeypatch.setenv("MLFLOW_PORT", "5123")
    ws = Workspace.at(tmp_path)
    write_json(ws.registration_path, {**REG, "model_name": "mnist-mlp", "aliases": [],
                                      "tracking_uri": embedded_tracking_uri(tmp_path)})
    md = run_summary(ws, {})
    assert "- [the training run](http://127.0.0.1:5123/#/runs/0123abcd)" in md
    assert "- [the model version](http://127.0.0.1:5123/#/models/mnist-mlp/versions/2)" in md


# --- each task alone, on a tiny workspace --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory) -> Path:
    """A fresh clone whose params point data.source at tiny synthetic IDX files; the task
    tests below run its stages one by one, in order."""
    root = tmp_path_factory.mktemp("tasks")
    clone = make_clone(root / "clone")
    source = write_raw_dir(root / "source")
    (clone / "params.yaml").write_text(render_overrides(
        (clone / "params.yaml").read_text(), {"data.source": source.as_uri(), **TINY_TRAIN}))
    return clone


@pytest.mark.integration
def test_check_and_download_tasks_run_then_only_the_check_runs(tiny_workspace):
    assert mt.TASKS["check"].fn(str(tiny_workspace)) == "ran"
    fingerprint = (tiny_workspace / "data" / "source.json").read_text()
    assert mt.TASKS["download"].fn(str(tiny_workspace)) == "ran"
    assert (tiny_workspace / "data" / "raw" / "manifest.json").is_file()
    lock = (tiny_workspace / "dvc.lock").read_text()
    assert mt.TASKS["check"].fn(str(tiny_workspace)) == "ran"  # always
    assert (tiny_workspace / "data" / "source.json").read_text() == fingerprint
    assert mt.TASKS["download"].fn(str(tiny_workspace)) == "skipped"
    assert (tiny_workspace / "dvc.lock").read_text() == lock


@pytest.mark.integration
def test_preprocess_task(tiny_workspace):
    assert mt.TASKS["preprocess"].fn(str(tiny_workspace)) == "ran"
    assert mt.TASKS["preprocess"].fn(str(tiny_workspace)) == "skipped"
    assert "preprocess" in dvc_lock(tiny_workspace)["stages"]
    assert json.loads((tiny_workspace / "data/processed/summary.json").read_text())["train"]


@pytest.mark.integration
def test_a_stage_restored_from_dvc_run_cache_reports_restored(tiny_workspace):
    """Back to params DVC has run the stage with before: DVC checks the outputs out of its run
    cache instead of starting the command, and the stage reports "restored"."""
    for stage in ("check", "download", "preprocess"):
        run_stage(stage, tiny_workspace)
    entry = dvc_lock(tiny_workspace)["stages"]["preprocess"]
    summary_path = tiny_workspace / "data/processed/summary.json"
    summary = summary_path.read_text()
    with params_overridden(tiny_workspace / "params.yaml", {"data.val_fraction": 0.2}):
        assert run_stage("preprocess", tiny_workspace) == "ran"
        assert summary_path.read_text() != summary
    assert run_stage("preprocess", tiny_workspace) == "restored"
    assert dvc_lock(tiny_workspace)["stages"]["preprocess"] == entry
    assert summary_path.read_text() == summary
    assert run_stage("preprocess", tiny_workspace) == "skipped"


@pytest.mark.integration
def test_train_task(tiny_workspace):
    assert mt.TASKS["train"].fn(str(tiny_workspace)) == "ran"
    assert dvc_lock(tiny_workspace)["stages"]["train"]["params"]["params.yaml"][
        "train.epochs"] == 1
    assert len(json.loads((tiny_workspace / "reports/training.json").read_text())["epochs"]) == 1


@pytest.mark.integration
def test_evaluate_task(tiny_workspace):
    assert mt.TASKS["evaluate"].fn(str(tiny_workspace)) == "ran"
    assert 0.0 <= json.loads((tiny_workspace / "reports/metrics.json").read_text())[
        "accuracy"] <= 1.0


@pytest.mark.integration
def test_register_task(tiny_workspace):
    assert mt.TASKS["register"].fn(str(tiny_workspace)) == "ran"
    registration = json.loads((tiny_workspace / "reports/registration.json").read_text())
    assert registration["model_name"] == "mnist-mlp" and registration["version"] is not None


@pytest.mark.integration
def test_a_failing_stage_names_itself_and_leaves_dvc_lock(fresh_clone, tmp_path):
    (fresh_clone / "params.yaml").write_text(render_overrides(
        (fresh_clone / "params.yaml").read_text(),
        {"data.source": (tmp_path / "nowhere").as_uri()}))
    lock = dvc_lock_text(fresh_clone)
    # The stage, DVC's exit status and the last line DVC wrote to stderr, as it wrote it.
    # A source that is not there fails at the freshness check, before any download.
    with pytest.raises(StageFailedError,
                       match=r"stage 'check' failed \(dvc repro exited [1-9]\d*\): \S"):
        mt.TASKS["check"].fn(str(fresh_clone))
    assert dvc_lock_text(fresh_clone) == lock
    assert not (fresh_clone / "data" / "raw").exists()
    assert not (fresh_clone / "data" / "source.json").exists()


@pytest.mark.integration
def test_an_unknown_stage_fails_quoting_dvc(fresh_clone):
    lock = dvc_lock_text(fresh_clone)
    with pytest.raises(StageFailedError, match=r"stage 'no-such-stage' failed "
                                               r"\(dvc status exited [1-9]\d*\): .*no-such-stage"):
        run_stage("no-such-stage", fresh_clone)
    assert dvc_lock_text(fresh_clone) == lock


# --- the whole flow under Prefect's test harness -------------------------------------------

@pytest.mark.integration
def test_a_stage_past_its_timeout_is_stopped(prefect_harness, fresh_clone, tiny_source,
                                             monkeypatch):
    """Prefect's task timeout stops the stage's `dvc repro` (and all under it): nothing
    half-recorded, DVC's lock released."""
    (fresh_clone / "params.yaml").write_text(render_overrides(
        (fresh_clone / "params.yaml").read_text(), {"data.source": tiny_source.as_uri()}))
    run_stage("check", fresh_clone)
    lock = dvc_lock_text(fresh_clone)
    with monkeypatch.context() as patch:
        # Straight to `dvc repro`, so that the timeout stops the stage, not `dvc status`.
        patch.setattr(mt, "changed_stages", lambda stages, _ws: stages)
        state = mt.TASKS["download"].with_options(retries=0, timeout_seconds=0.3)(
            str(fresh_clone), return_state=True)
    assert state.is_failed() and "timeout" in state.message, state
    # Nothing half-recorded: dvc.lock is as it was, or (when the stop landed while DVC was
    # already committing) it records the complete stage, which DVC then finds up to date.
    after = dvc_lock_text(fresh_clone)
    # DVC released its lock: the stage runs normally afterwards.
    outcome = run_stage("download", fresh_clone)
    if after == lock:
        assert outcome == "ran"
    else:
        assert outcome == "skipped" and dvc_lock_text(fresh_clone) == after


def _task_runs_in_order(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    # A task run is named <task name>-<3-character suffix>.
    return [r.name.rsplit("-", 1)[0] for r in sorted(runs, key=lambda r: r.start_time)]


def _summary_artifact() -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
        return next(a.data for a in artifact if a.key == "mnist-training-summary")


def _run_logs(flow_run_id) -> list[str]:
    """The flow run's log messages (its tasks' included) as the Prefect API has them, once
    the engine's last line ("Finished in state ...") has arrived (logs are sent in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            messages = [log.message for log in sorted(logs, key=lambda log: log.timestamp)]
            if any(m.startswith("Finished in state") for m in messages):
                return messages
            assert time.monotonic() < deadline, messages
            time.sleep(0.5)


@pytest.mark.integration
def test_flow_rejects_a_bad_override_before_any_stage(prefect_harness, fresh_clone):
    params_before = (fresh_clone / "params.yaml").read_text()
    lock = dvc_lock_text(fresh_clone)
    with pytest.raises(ConfigError, match=r"train\.epochs: 0"):
        mt.mnist_training(epochs=0, workspace=str(fresh_clone))
    # Failed, with the error's one line as the state's message and in the log (what
    # `prefect deployment run --watch` prints), and no traceback anywhere in the run's log.
    state = mt.mnist_training(epochs=-1, workspace=str(fresh_clone), return_state=True)
    assert state.is_failed() and "train.epochs" in state.message, state
    assert "\n" not in state.message and "Traceback" not in state.message
    logs = _run_logs(state.state_details.flow_run_id)
    assert state.message in logs, logs
    assert not [m for m in logs if "Traceback" in m], logs
    assert dvc_lock_text(fresh_clone) == lock
    assert not (fresh_clone / "data" / "raw").exists()
    assert (fresh_clone / "params.yaml").read_text() == params_before


@pytest.mark.integration
def test_a_bad_parameter_fails_a_deployment_run_in_one_line(prefect_harness, fresh_clone):
    """Run by Prefect's engine, as a worker runs a deployment's flow run: the user's bad value
    ends the run Failed with its one line, and nothing in the log reads like a crash."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    mt.mnist_training.to_deployment(name="bad-input").apply()
    run = run_deployment("mnist-training/bad-input", timeout=0,
                         parameters={"epochs": -1, "workspace": str(fresh_clone)})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    done = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "execute", str(run.id)],
                          cwd=mt.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "unexpected exception" not in done.stdout + done.stderr, done.stdout + done.stderr
    logs = _run_logs(run.id)
    said = [m for m in logs if "train.epochs" in m and not m.startswith("Finished in state")]
    assert len(said) == 1 and said[0].startswith("invalid value for train.epochs: -1"), logs
    assert any(m.startswith("Finished in state Failed") for m in logs), logs
    assert not [m for m in logs if "unexpected exception" in m or "Traceback" in m], logs


@pytest.mark.integration
def test_a_failing_stage_fails_the_run_with_its_cause_in_one_line(prefect_harness,
                                                                  fresh_clone, tmp_path,
                                                                  monkeypatch):
    """A stage whose command fails with an error of dltrain's own: the task and the flow run
    end Failed naming the stage and quoting that error, with no traceback in the logs."""
    # No retries: the check's three, with their back-off, would only make the test slow.
    monkeypatch.setitem(mt.TASKS, "check", mt.TASKS["check"].with_options(retries=0))
    nowhere = tmp_path / "nowhere"
    state = mt.mnist_training(workspace=str(fresh_clone), return_state=True,
                              overrides={"data.source": str(nowhere)})
    assert state.is_failed(), state
    assert state.message.startswith("stage 'check' failed (dvc repro exited "), state.message
    assert "dltrain check: error:" in state.message and str(nowhere) in state.message
    logs = _run_logs(state.state_details.flow_run_id)
    assert state.message in logs
    assert any(m.startswith("Task run failed with exception: StageFailedError") for m in logs)
    assert not [m for m in logs if "Traceback" in m], logs


@pytest.mark.integration
def test_an_unexpected_error_keeps_its_traceback(prefect_harness, fresh_clone, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("a bug in the flow")

    monkeypatch.setattr(mt, "run_pipeline", broken)
    state = mt.mnist_training(workspace=str(fresh_clone), return_state=True)
    assert state.is_failed()
    logs = _run_logs(state.state_details.flow_run_id)
    assert any("Traceback" in m and "a bug in the flow" in m for m in logs), logs


def _link_artifact(key: str, flow_run_id) -> str:
    """The link of the run's link artifact `key`, read back through Prefect's API."""
    artifact = run_artifact(key, flow_run_id)
    assert artifact.type == "markdown", artifact  # a link is markdown
    return artifact.data


@pytest.mark.integration
def test_flow_runs_the_stages_in_order_then_skips_them(prefect_harness, fresh_clone,
                                                      tiny_source, monkeypatch):
    monkeypatch.setenv("MLFLOW_PORT", "5123")  # where `make mlflow-ui` would serve the store
    params_before = (fresh_clone / "params.yaml").read_text()
    run = dict(epochs=1, num_workers=0, workspace=str(fresh_clone),
               overrides={"data.source": tiny_source.as_uri()})
    state = mt.mnist_training(**run, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {s: "ran" for s in mt.STAGES}
    assert _task_runs_in_order(state.state_details.flow_run_id) == mt.STAGES
    # The run's overrides are recorded in dvc.lock; params.yaml is as it was.
    train_params = dvc_lock(fresh_clone)["stages"]["train"]["params"]["params.yaml"]
    assert (train_params["train.epochs"], train_params["train.num_workers"]) == (1, 0)
    assert (fresh_clone / "params.yaml").read_text() == params_before
    summary = _summary_artifact()
    assert "| train | ran |" in summary and "| 1 | " in summary and "accuracy" in summary

    # The MLflow links (the run and the version) as the Prefect API holds them: on the
    # embedded store, where `make mlflow-ui` serves it; the run and version exist there.
    from mlflow import MlflowClient

    reg = json.loads((fresh_clone / "reports/registration.json").read_text())
    flow_run_id = state.state_details.flow_run_id
    run_link = f"http://127.0.0.1:5123/#/runs/{reg['run_id']}"
    version_link = f"http://127.0.0.1:5123/#/models/mnist-mlp/versions/{reg['version']}"
    assert f"({run_link})" in _link_artifact("mnist-mlflow-run", flow_run_id)
    assert f"({version_link})" in _link_artifact("mnist-model", flow_run_id)
    assert f"[the training run]({run_link})" in summary
    assert f"[the model version]({version_link})" in summary
    client = MlflowClient(tracking_uri=reg["tracking_uri"])
    assert client.get_model_version("mnist-mlp", str(reg["version"])).run_id == reg["run_id"]
    assert client.get_run(reg["run_id"]).data.metrics

    # Nothing changed: the check runs, finds the data unchanged and DVC every stage up to
    # date; no other task starts, no new version is registered, and the summary says why.
    registration = (fresh_clone / "reports/registration.json").read_text()
    lock = dvc_lock_text(fresh_clone)
    again = mt.mnist_training(**run, return_state=True)
    assert again.result() == SKIPPED
    assert _task_runs_in_order(again.state_details.flow_run_id) == ["check"]
    assert (fresh_clone / "reports/registration.json").read_text() == registration
    assert dvc_lock_text(fresh_clone) == lock
    summary = _summary_artifact()
    assert "**skipped: data unchanged**" in summary and "`" + tiny_source.as_uri() + "`" in summary
    assert "| train | skipped |" in summary and "nothing registered in this run" in summary


@pytest.mark.integration
def test_a_second_run_on_a_busy_workspace_fails_fast(prefect_harness, fresh_clone):
    params_before = (fresh_clone / "params.yaml").read_text()
    lock = dvc_lock_text(fresh_clone)
    with workspace_lock(fresh_clone, "flow run 0000 (first-run)"):
        start = time.monotonic()
        with pytest.raises(WorkspaceBusyError, match=r"in use by another pipeline run "
                                                     r"\(flow run 0000 \(first-run\)"):
            mt.mnist_training(epochs=1, workspace=str(fresh_clone))
        assert time.monotonic() - start < 30  # no waiting on the first run
    assert (fresh_clone / "params.yaml").read_text() == params_before
    assert dvc_lock_text(fresh_clone) == lock


@pytest.mark.integration
def test_changed_stages_follow_dvc_status(tiny_workspace, tmp_path, monkeypatch):
    """Unchanged after a run, changed after an edit of a param the stage reads, from any
    working directory."""
    monkeypatch.chdir(tmp_path)
    for stage in ("check", "download", "preprocess"):
        run_stage(stage, tiny_workspace)
    assert changed_stages(["download", "preprocess"], tiny_workspace) == []
    assert changed_stages(["check", "download"], tiny_workspace) == ["check"]  # always
    with params_overridden(tiny_workspace / "params.yaml", {"data.val_fraction": 0.2}):
        # download does not read val_fraction
        assert changed_stages(["download", "preprocess"], tiny_workspace) == ["preprocess"]
