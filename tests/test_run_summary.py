"""What `make run` ends with: dltrain's summary of the run (`dltrain summary`), not DVC's advice
to `git add` and `dvc push`; a run that changed nothing says so in one line."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from dltrain.cli import main
from dltrain.paths import Workspace

from helpers.repo import venv_env

REGISTRATION = {"model_name": "mnist-mlp", "version": 3, "aliases": ["champion"],
                "registered": True, "new_version": True,
                "reason": "test accuracy 0.8859 beats the champion's 0.8712 by 0.0147"}
NEXT = ["dvc metrics show", "make mlflow-ui", "dltrain predict"]


def _write_reports(ws: Workspace, registration: dict | None = REGISTRATION) -> None:
    ws.reports_dir.mkdir(parents=True, exist_ok=True)
    ws.metrics_path.write_text(json.dumps({"accuracy": 0.88591, "loss": 0.32, "n": 10000}))
    if registration is not None:
        ws.registration_path.write_text(json.dumps(registration))


def _summary(ws: Workspace, capsys: pytest.CaptureFixture, *args: str) -> str:
    assert main(["summary", "--workspace", str(ws.root), *args]) == 0
    return capsys.readouterr().out


def test_the_summary_gives_accuracy_registry_outcome_and_where_to_look(tmp_path, capsys):
    ws = Workspace.at(tmp_path)
    _write_reports(ws)
    out = _summary(ws, capsys, "--since", str(time.time() - 60))
    lines = out.splitlines()
    assert lines[0] == "dltrain: test accuracy 0.8859"
    assert lines[1] == ("  registry: registered a new version: mnist-mlp version 3 (champion); "
                        "test accuracy 0.8859 beats the champion's 0.8712 by 0.0147")
    assert len(lines) == 5 and all(cmd in out for cmd in NEXT), out


def test_a_gated_model_says_it_was_not_registered_and_why(tmp_path, capsys):
    ws = Workspace.at(tmp_path)
    _write_reports(ws, {"model_name": "mnist-mlp", "version": None, "registered": False,
                        "reason": "test accuracy 0.5 is below register.min_accuracy 0.8: "
                                  "not registered"})
    out = _summary(ws, capsys)
    assert ("  registry: not registered: no registered version; test accuracy 0.5 is below "
            "register.min_accuracy 0.8") in out


def test_a_run_that_wrote_no_report_says_nothing_changed_in_one_line(tmp_path, capsys):
    ws = Workspace.at(tmp_path)
    _write_reports(ws)
    out = _summary(ws, capsys, "--since", str(time.time() + 5))
    assert out == ("dltrain: nothing changed, every stage is up to date: test accuracy 0.8859; "
                   "mnist-mlp version 3 (champion)\n")


def test_no_reports_yet_says_which_is_missing(tmp_path, capsys):
    out = _summary(Workspace.at(tmp_path), capsys)
    assert "no test accuracy yet (reports/metrics.json is missing)" in out
    assert "no registration yet" in out


# --- `make run` itself, with a stand-in for `dvc repro` (subprocesses: the integration tier) --

# DVC's output after a run that changed dvc.lock, as `dvc repro` prints it on stdout.
DVC_OUTPUT = """Running stage 'evaluate':
> dltrain evaluate
evaluate: test accuracy 0.8859, loss 0.3219 on 10000 images
Updating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add dvc.lock reports/.gitignore

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
"""


def _make_run(clone: Path, tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """`make run` in `clone`, with `script` (bash) as `dvc`; no set-up (-o)."""
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    (stub / "dvc").write_text(f"#!/bin/bash\n{script}\n")
    (stub / "dvc").chmod(0o755)
    env = venv_env()
    env["PATH"] = f"{stub}{os.pathsep}{env['PATH']}"
    return subprocess.run(["make", "-s", "-o", ".venv/.dltrain-installed", "-o", "data-package",
                           "run"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def clone_with_reports(fresh_clone: Path) -> Path:
    _write_reports(Workspace.at(fresh_clone))
    return fresh_clone


@pytest.mark.integration
def test_make_run_ends_with_the_summary_not_dvcs_hints(clone_with_reports, tmp_path):
    # The stand-in rewrites the reports, as the evaluate and register stages do.
    touch = "touch reports/metrics.json reports/registration.json"
    done = _make_run(clone_with_reports, tmp_path, f"{touch}\ncat <<'EOF'\n{DVC_OUTPUT}EOF")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "git add" not in done.stdout and "dvc push" not in done.stdout, done.stdout
    assert "autostage" not in done.stdout, done.stdout
    assert "evaluate: test accuracy 0.8859" in done.stdout  # the stages' own output stays
    tail = done.stdout.rstrip("\n").splitlines()[-5:]
    assert tail[0] == "dltrain: test accuracy 0.8859", done.stdout
    assert tail[1].startswith("  registry: registered a new version: mnist-mlp version 3")
    assert all(any(cmd in line for line in tail[2:]) for cmd in NEXT), done.stdout


@pytest.mark.integration
def test_make_run_that_changed_nothing_ends_with_one_line(clone_with_reports, tmp_path):
    past = time.time() - 3600
    for path in (clone_with_reports / "reports").iterdir():
        os.utime(path, (past, past))
    done = _make_run(clone_with_reports, tmp_path, """cat <<'EOF'
Running stage 'check':
Stage 'train' didn't change, skipping
Use `dvc push` to send your updates to remote storage.
EOF""")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.rstrip("\n").splitlines()[-1] == (
        "dltrain: nothing changed, every stage is up to date: test accuracy 0.8859; "
        "mnist-mlp version 3 (champion)"), done.stdout
    assert "dvc push" not in done.stdout and "registry:" not in done.stdout


@pytest.mark.integration
def test_make_run_fails_as_dvc_does_with_its_error_and_no_summary(clone_with_reports, tmp_path):
    done = _make_run(clone_with_reports, tmp_path, """echo "Running stage 'train':"
echo "ERROR: failed to reproduce 'train': failed to run: dltrain train, exited with 1" >&2
exit 1""")
    assert done.returncode != 0
    assert "ERROR: failed to reproduce 'train'" in done.stderr
    assert "Running stage 'train':" in done.stdout and "dltrain:" not in done.stdout
