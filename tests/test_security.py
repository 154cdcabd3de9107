"""Security properties: model files and checkpoints load as weights only (a planted pickle
payload is refused and never runs), servers the project starts bind to loopback unless told
otherwise, and no credentials are in the repo or in what the pipeline writes."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, save_file

from dltrain.cli import main
from dltrain.config import params_from_dict
from dltrain.data.download import download
from dltrain.data.freshness import check
from dltrain.errors import (
    ConfigError,
    DataError,
    DltrainError,
    DownloadError,
    ModelError,
    RegistryError,
)
from dltrain.evaluate.stage import evaluate
from dltrain.paths import Workspace
from dltrain.registry.register import register
from dltrain.tracking.store import display_uri, redact
from dltrain.train.loop import (
    CHECKPOINT_HISTORY,
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_STATE,
    load_state,
)
from dltrain.urls import redact_text, redact_url

from helpers.data import RAW_FILES
from helpers.models import evaluated_workspace
from helpers.payload import Payload
from helpers.repo import REPO_ROOT

FAST = {"retries": 1, "backoff_s": 0.0, "timeout_s": 5.0, "progress": False}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return evaluated_workspace(tmp_path_factory.mktemp("security"))


@pytest.fixture
def poisoned(tmp_path: Path, evaluated: Workspace) -> tuple[Workspace, Path]:
    """A copy of the evaluated workspace whose models/model.safetensors is replaced by a
    torch.save of the real weights plus a pickle payload (same card, same shapes): only
    unpickling would run it."""
    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(evaluated.root, ws.root)
    marker = tmp_path / "payload-ran"
    state = load(ws.model_path.read_bytes())  # not load_file: its arrays map the file
    torch.save({**state, "extra": Payload(marker)}, ws.model_path)
    return ws, marker


def test_evaluate_refuses_a_pickle_payload_without_running_it(poisoned) -> None:
    ws, marker = poisoned
    metrics_before = ws.metrics_path.read_bytes()
    with pytest.raises(ModelError, match="not plain weights") as info:
        evaluate(ws.model_path, ws.processed_dir, ws.reports_dir, batch_size=256)
    assert str(ws.model_path) in str(info.value)
    assert not marker.exists()
    assert ws.metrics_path.read_bytes() == metrics_before


def test_register_refuses_a_pickle_payload_without_running_it(poisoned, capsys) -> None:
    ws, marker = poisoned
    with pytest.raises(ModelError, match="not plain weights"):
        register(ws, params_from_dict({"register": {"min_accuracy": 0.5}}))
    assert main(["register", "--workspace", str(ws.root)]) == 1
    assert "would run code when loaded" in capsys.readouterr().err
    assert not marker.exists()
    assert not ws.registration_path.exists()
    assert not (ws.root / "mlruns").exists()  # refused before MLflow was touched


def test_cli_evaluate_refuses_it_too(poisoned, capsys) -> None:
    ws, marker = poisoned
    assert main(["evaluate", "--workspace", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert "not plain weights" in err and "Traceback" not in err
    assert not marker.exists()


def test_training_checkpoint_with_a_payload_is_refused(tmp_path: Path) -> None:
    """What a resumed run loads (dltrain.train.loop.load_state): weights only, too."""
    checkpoint = tmp_path / "epoch_0002"
    checkpoint.mkdir()
    marker = tmp_path / "payload-ran"
    # The tensors are safetensors (no pickle at all); the optimizer's state is torch's format.
    save_file({"model/w": torch.zeros(2)}, checkpoint / CHECKPOINT_STATE)
    torch.save({"state": {}, "param_groups": [], "extra": Payload(marker)},
               checkpoint / CHECKPOINT_OPTIMIZER)
    (checkpoint / CHECKPOINT_HISTORY).write_text(json.dumps([{"epoch": 2}]))
    with pytest.raises(ModelError, match="would run code when loaded") as info:
        load_state(checkpoint)
    assert str(checkpoint / CHECKPOINT_OPTIMIZER) in str(info.value)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    checkpoint = tmp_path / "epoch_0001"
    checkpoint.mkdir()
    save_file({"model/w": torch.zeros(1000)}, checkpoint / "full.safetensors")
    data = (checkpoint / "full.safetensors").read_bytes()
    (checkpoint / CHECKPOINT_STATE).write_bytes(data[:len(data) // 2])
    torch.save({"state": {}, "param_groups": []}, checkpoint / CHECKPOINT_OPTIMIZER)
    (checkpoint / CHECKPOINT_HISTORY).write_text("[]")
    with pytest.raises(ModelError, match="corrupt or incomplete"):
        load_state(checkpoint)


# ----------------------------------------------------------------------------- loopback

def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO_ROOT, check=True, capture_output=True).stdout
    return [REPO_ROOT / p for p in out.decode().split("\0") if p and (REPO_ROOT / p).is_file()]


# Configs for real deployments, where the dashboard must be reachable from other machines:
# binding all interfaces is what they are told to do (and they say so).
ALL_INTERFACES_ALLOWED = {"infra/cloud/ray-cluster-aws-gpu.yaml", "infra/k8s/raycluster.yaml"}


def test_only_the_cluster_deployment_configs_bind_all_interfaces() -> None:
    offenders = []
    for path in tracked_files():
        rel = str(path.relative_to(REPO_ROOT))
        if (rel.startswith(("tests/", "RELIABILITY.md"))
                or path.suffix in (".png", ".pt", ".safetensors")):
            continue
        text = path.read_text(errors="replace")
        if re.search(r"0\.0\.0\.0|--host[= ]+(::|\[::\])", text) and rel not in \
                ALL_INTERFACES_ALLOWED:
            offenders.append(rel)
    assert offenders == []


def test_local_servers_are_started_on_loopback() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"mlflow ui --host 127\.0\.0\.1 ", makefile)
    stack = (REPO_ROOT / "infra" / "prefect" / "stack.py").read_text()
    assert 'HOST = "127.0.0.1"' in stack
    assert '["server", "start", "--host", HOST' in stack
    assert "PREFECT_SERVER_API_HOST=HOST" in stack
    deploy = (REPO_ROOT / "infra" / "prefect" / "deploy.sh").read_text()
    assert "http://127.0.0.1:" in deploy
    cluster = (REPO_ROOT / "infra" / "local-cluster" / "cluster.py").read_text()
    assert 'HOST = "127.0.0.1"' in cluster and '"--node-ip-address", HOST' in cluster
    # The private Ray of `dltrain train` starts without the dashboard's web server.
    connect = (REPO_ROOT / "dltrain" / "train" / "connect.py").read_text()
    assert 'ray.init(address="local", num_cpus=cpus, include_dashboard=False' in connect


def test_servers_in_the_tests_bind_loopback() -> None:
    for path in (REPO_ROOT / "tests").glob("*.py"):
        if path.name == "test_security.py":  # this file names what it looks for
            continue
        text = path.read_text()
        assert "0.0.0.0" not in text, path
        for match in re.finditer(r"--host\", \"([^\"]+)\"", text):
            assert match.group(1) == "127.0.0.1", path


# ----------------------------------------------------------------------------- credentials

SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",                                      # AWS access key id
    r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}",
    r"(?i)(api[_-]?key|password|passwd|secret|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{16,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"gh[pousr]_[A-Za-z0-9]{30,}",                            # GitHub tokens
    r"https?://[^/\s:@'\"]+:[^/\s@'\"*{}$<]+@",               # a URL with user:password
]
URL_WITH_PASSWORD = SECRET_PATTERNS[-1]


def test_no_credentials_in_any_tracked_file() -> None:
    hits = []
    for path in tracked_files():
        if path.suffix in (".png", ".pt", ".safetensors", ".gz"):
            continue
        text = path.read_text(errors="replace")
        for pattern in SECRET_PATTERNS:
            for match in re.finditer(pattern, text):
                if path.name == "test_security.py":  # the patterns and their own test cases
                    continue
                if pattern == URL_WITH_PASSWORD and path.relative_to(REPO_ROOT).parts[0] == "tests":
                    continue  # tests plant made-up ones, to prove they are refused or redacted
                hits.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)[:40]}")
    assert hits == []


def test_dvc_config_holds_no_remote_credentials() -> None:
    config = (REPO_ROOT / ".dvc" / "config").read_text()
    for key in ("access_key_id", "secret_access_key", "session_token", "password", "user"):
        assert key not in config
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=REPO_ROOT,
                             capture_output=True, text=True)
    assert ignored.returncode == 0  # machine-local remote settings never reach git


@pytest.mark.parametrize("uri,shown", [
    ("http://alice:s3cr3t-pw@mlflow.example:5000", "http://alice:***@mlflow.example:5000"),
    ("https://bob:p%40ss@host/path", "https://bob:***@host/path"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////repo/mlruns/mlflow.db", "sqlite:////repo/mlruns/mlflow.db"),
])
def test_tracking_uri_is_shown_without_its_password(uri: str, shown: str) -> None:
    assert display_uri(uri) == shown


def test_errors_quoting_the_uri_are_redacted() -> None:
    uri = "http://alice:p%40ss-w0rd@host:5000"
    text = f"API request to {uri}/api/2.0/mlflow/runs/create failed; password p@ss-w0rd"
    assert "w0rd" not in redact(text, uri)
    assert redact("no uri here", "http://127.0.0.1:5000") == "no uri here"


def test_unreachable_server_error_does_not_leak_the_password(tmp_path: Path, evaluated,
                                                             capsys, monkeypatch) -> None:
    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(evaluated.root, ws.root)
    uri = "http://alice:hunter2-secret@127.0.0.1:9"  # port 9 (discard): refused on loopback
    # The environment is the one route that may carry a password (it reaches no file).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(RegistryError) as info:
        register(ws, params_from_dict({}), attempts=1, backoff_s=0.0)
    assert "hunter2" not in str(info.value) and "alice:***@127.0.0.1:9" in str(info.value)
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err
    assert not ws.registration_path.exists()


# --- a password in a URL: refused where it would be stored, redacted where it is shown ---------

PLANTED = "hunter2-planted"


@pytest.mark.parametrize(("key", "url", "instead"), [
    ("register.tracking_uri", f"http://alice:{PLANTED}@mlflow.example:5000",
     ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "netrc"]),
    ("data.source", f"https://alice:{PLANTED}@data.example/fashion", ["netrc"]),
    ("train.storage_path", f"s3://AKEXAMPLE:{PLANTED}@bucket/ray", ["AWS_ACCESS_KEY_ID",
                                                                  "AWS_SECRET_ACCESS_KEY"]),
    ("train.ray_address", f"ray://alice:{PLANTED}@head.example:10001", ["HOST:PORT"]),
])
def test_a_password_in_a_url_setting_is_refused_naming_the_key_and_what_to_use(
        tmp_path: Path, capsys, key: str, url: str, instead: list[str]) -> None:
    """Every URL setting reaches dvc.lock (and so git): a password there is refused, by the
    config and by the CLI's -S, in one line that never repeats it."""
    section, name = key.split(".")
    with pytest.raises(ConfigError) as info:
        params_from_dict({section: {name: url}})
    message = str(info.value)
    assert key in message and PLANTED not in message and ":***@" in message
    for word in instead:
        assert word in message
    (tmp_path / "params.yaml").write_text("{}\n")
    code = main(["check", "--workspace", str(tmp_path), "-S", f"{key}={url}"])
    err = capsys.readouterr().err
    assert code == ConfigError.exit_code and key in err and PLANTED not in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_url_without_a_password_is_still_accepted() -> None:
    params = params_from_dict({"register": {"tracking_uri": "http://alice@mlflow.example:5000"},
                               "data": {"source": "https://data.example/fashion"},
                               "train": {"storage_path": "s3://bucket/ray"}})
    assert params.register.tracking_uri == "http://alice@mlflow.example:5000"


def test_a_failing_source_url_with_a_password_is_redacted_everywhere(tmp_path: Path,
                                                                     capsys) -> None:
    """Through the API (the config refuses it first): the download's and the check's errors,
    retry lines and files name the source without its password."""
    source = f"http://alice:{PLANTED}@127.0.0.1:9/fashion"  # port 9: refused on loopback
    with pytest.raises(DownloadError) as info:
        download("fashion-mnist", source, tmp_path / "raw", retries=2, backoff_s=0.0,
                 timeout_s=2.0, progress=False)
    assert PLANTED not in str(info.value) and "alice:***@127.0.0.1" in str(info.value)
    with pytest.raises(DltrainError) as info:
        check("fashion-mnist", source, tmp_path / "source.json", retries=2, backoff_s=0.0,
              timeout_s=2.0)
    assert PLANTED not in str(info.value) and "alice:***@127.0.0.1" in str(info.value)
    out = capsys.readouterr()
    assert PLANTED not in out.out + out.err
    assert not (tmp_path / "raw").exists() and not (tmp_path / "source.json").exists()


def test_the_redaction_helper_covers_any_url_in_a_text() -> None:
    text = (f"GET https://bob:{PLANTED}@h/x failed; s3://k:{PLANTED}@b/p; "
            "http://127.0.0.1:5000 fine")
    assert PLANTED not in redact_text(text)
    assert "http://127.0.0.1:5000 fine" in redact_text(text)
    assert redact_url(f"http://alice:{PLANTED}@[::1]:5000/p") == "http://alice:***@[::1]:5000/p"


@pytest.fixture
def basic_auth_source(tiny_source: Path):
    """The tiny data set over HTTP on 127.0.0.1, behind HTTP basic auth (alice / PLANTED)."""
    expected = "Basic " + base64.b64encode(f"alice:{PLANTED}".encode()).decode()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="data"')
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(tiny_source)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_source_behind_a_login_takes_it_from_netrc_and_writes_it_nowhere(
        tmp_path: Path, basic_auth_source: str, monkeypatch, capsys) -> None:
    """What the refusal above points to: the login in a netrc file, the URL without it."""
    raw = tmp_path / "raw"
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    with pytest.raises(DownloadError, match="HTTP 401"):
        download("fashion-mnist", basic_auth_source, raw, **FAST)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text(f"machine 127.0.0.1 login alice password {PLANTED}\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    result = check("fashion-mnist", basic_auth_source, tmp_path / "source.json", **FAST)
    manifest = download("fashion-mnist", basic_auth_source, raw, fingerprint=result.fingerprint,
                        **FAST)
    assert set(manifest["files"]) == set(RAW_FILES.values())
    out = capsys.readouterr()
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.json"))
    assert PLANTED not in out.out + out.err + written


# --- a tampered test split ------------------------------------------------------------------------

def test_a_tampered_test_split_is_refused_by_evaluate_and_by_the_champion_re_score(
        tmp_path: Path, evaluated: Workspace, capsys) -> None:
    """Test labels relabelled after preprocess (the issue's case: replaced by the model's own
    predictions, accuracy 1.0 if trusted): evaluate hashes the arrays it reads, finds they are
    not what summary.json records, and fails in one line naming the files and the fix;
    metrics.json is untouched. The register stage's champion re-score reads the split through
    the same function."""
    from dltrain.evaluate.stage import score_model

    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(evaluated.root, ws.root)
    labels_path = ws.processed_dir / "test_labels.npy"
    labels = np.load(labels_path)
    labels[:20] = (labels[:20] + 1) % 10
    np.save(labels_path, labels, allow_pickle=False)
    metrics_before = ws.metrics_path.read_bytes()

    assert main(["evaluate", "--workspace", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "test_labels.npy" in err and "dvc repro preprocess" in err
    assert "not the test split preprocess wrote" in err
    assert ws.metrics_path.read_bytes() == metrics_before
    with pytest.raises(DataError, match="not the test split preprocess wrote"):
        score_model(ws.model_path, ws.processed_dir, batch_size=256)


@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_test_labels_are_one_line_even_with_a_matching_summary(
        tmp_path: Path, evaluated: Workspace, capsys, bad: int) -> None:
    """Labels 10 or -1 in test_labels.npy, with summary.json edited to match them: a DataError
    naming the file, not numpy's "cannot reshape" traceback."""
    ws = Workspace.at(tmp_path / "ws")
    shutil.copytree(evaluated.root, ws.root)
    labels = np.load(ws.processed_dir / "test_labels.npy").astype(np.int64)
    labels[0] = bad
    np.save(ws.processed_dir / "test_labels.npy", labels, allow_pickle=False)
    summary_path = ws.processed_dir / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["test"]["sha256"] = hashlib.sha256(
        (ws.processed_dir / "test_images.npy").read_bytes()
        + (ws.processed_dir / "test_labels.npy").read_bytes()).hexdigest()
    summary_path.write_text(json.dumps(summary))
    assert main(["evaluate", "--workspace", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test_labels.npy" in err and "0..9" in err
