"""The `dltrain` command's exit: the status main() chose, reached without the interpreter's
teardown, after every atexit handler registered during the command."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.repo import venv_env

DLTRAIN = Path(sys.executable).parent / "dltrain"


def dltrain(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DLTRAIN), *args], cwd=cwd, env=venv_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command", [[str(DLTRAIN)], [sys.executable, "-m", "dltrain"]],
                         ids=["console-script", "python-m"])
@pytest.mark.parametrize("args,expected", [(["--help"], 0), ([], 2), (["no-such-stage"], 2)])
def test_usage_exits_with_argparse_status(command: list[str], args: list[str], expected: int,
                                          tmp_path: Path) -> None:
    done = subprocess.run(command + args, cwd=tmp_path, env=venv_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == expected, done.stderr
    assert "usage: dltrain" in done.stdout + done.stderr


def test_a_config_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("no_such_section:\n  key: 1\n")
    done = dltrain("preprocess", "--workspace", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dltrain preprocess: error:"), done.stderr


# A command replaced by one that registers an atexit handler, as Ray or MLflow do when first
# used, prints without flushing (stdout is a pipe, so block-buffered), then ends as told.
EMBEDDED = textwrap.dedent("""
    import atexit, sys
    from pathlib import Path

    import dltrain.cli
    from dltrain.errors import ConfigError

    marker, outcome = sys.argv[1:]

    def command(args):
        atexit.register(Path(marker).write_text, "handler ran")
        print("stage output", end="")
        if outcome == "config-error":
            raise ConfigError("bad params")
        if outcome == "interrupt":
            raise KeyboardInterrupt
        if outcome == "bug":
            raise RuntimeError("a bug")

    dltrain.cli.cmd_preprocess = command
    sys.argv = ["dltrain", "preprocess"]
    dltrain.cli.run()
""")


@pytest.mark.parametrize("outcome,expected", [("success", 0), ("config-error", 2),
                                              ("interrupt", 130), ("bug", 1)])
def test_handlers_registered_during_the_command_run_and_the_status_is_kept(
        outcome: str, expected: int, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    done = subprocess.run([sys.executable, "-c", EMBEDDED, str(marker), outcome], cwd=tmp_path,
                          env=venv_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == expected, done.stderr
    assert marker.read_text() == "handler ran"
    assert done.stdout == "stage output"
    if outcome == "bug":
        assert "RuntimeError: a bug" in done.stderr


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    done = dltrain("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"dltrain {version('dltrain')}"
