"""infra/ for real deployments, checked without a cloud, a Kubernetes cluster or a docker engine:
the Ray cluster-launcher config passes Ray's own validation, the Kubernetes manifests carry
their required fields, the Dockerfile installs the package exactly as the Makefile does, the
S3 DVC remote is added machine-locally, and no credentials are anywhere in infra/."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers.repo import REPO_ROOT, venv_env

INFRA = REPO_ROOT / "infra"
CLOUD_CONFIG = INFRA / "cloud" / "ray-cluster-aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
IMAGE = "ghcr.io/example/dltrain:0.1.0"


def makefile_install_args() -> list[str]:
    """The pip arguments of the Makefile's install line (after `python -m pip install`)."""
    text = (REPO_ROOT / "Makefile").read_text()
    match = re.search(r"-m pip install (.+)", text)
    assert match, "the Makefile has no `python -m pip install` line"
    return shlex.split(match.group(1))


def install_args_in(command: str) -> list[str]:
    match = re.search(r"-m pip install (.+?)(?:$|&&|;)", command)
    assert match, f"no `python -m pip install` in {command!r}"
    return shlex.split(match.group(1))


# ----------------------------------------------------------------------------- Ray launcher

def test_cloud_cluster_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(CLOUD_CONFIG.read_text()))
    validate_config(config)  # raises jsonschema.ValidationError / ValueError if invalid
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert sum(t["min_workers"] for t in workers) >= 2  # a multi-node cluster from the start


def test_cloud_cluster_installs_the_package_like_the_makefile() -> None:
    config = yaml.safe_load(CLOUD_CONFIG.read_text())
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    assert installs, "setup_commands install nothing"
    assert install_args_in(installs[0]) == makefile_install_args()


def test_an_invalid_cloud_config_is_refused_by_the_same_validation() -> None:
    """The validation has teeth: a typo'd key fails it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(CLOUD_CONFIG.read_text())
    config["available_node_types"]["ray.worker.gpu"]["min_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(config))


# ----------------------------------------------------------------------------- Kubernetes

def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict:
    found = [d for d in k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_every_manifest_has_api_version_kind_and_name() -> None:
    docs = k8s_docs()
    assert {d["kind"] for d in docs} >= {"RayCluster", "Deployment", "PersistentVolumeClaim"}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_raycluster_head_and_gpu_workers_run_the_image_with_resources() -> None:
    rc = by_kind("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["spec"]["rayVersion"] == "2.60.0"
    head = _containers(rc["spec"]["headGroupSpec"]["template"])[0]
    assert head["image"] == IMAGE
    assert head["resources"]["limits"]["cpu"] and head["resources"]["limits"]["memory"]
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        worker = _containers(group["template"])[0]
        assert worker["image"] == IMAGE
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_prefect_worker_serves_the_ray_pool_and_reaches_the_ray_head() -> None:
    dep = by_kind("Deployment")
    assert dep["apiVersion"] == "apps/v1"
    spec = dep["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    worker = _containers(spec["template"])[0]
    assert worker["image"] == IMAGE
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    pool = worker["command"][worker["command"].index("--pool") + 1]
    prefect_yaml = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    scheduled = next(d for d in prefect_yaml["deployments"] if d["name"] == "scheduled-retraining")
    assert pool == scheduled["work_pool"]["name"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    rc_name = by_kind("RayCluster")["metadata"]["name"]
    # KubeRay names the head service <cluster>-head-svc; the GCS port is 6379.
    assert env["RAY_ADDRESS"] == f"{rc_name}-head-svc:6379"


def test_ray_pods_and_prefect_worker_share_the_workspace_volume() -> None:
    claim = by_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    rc, dep = by_kind("RayCluster"), by_kind("Deployment")
    templates = [rc["spec"]["headGroupSpec"]["template"], dep["spec"]["template"]]
    templates += [g["template"] for g in rc["spec"]["workerGroupSpecs"]]
    for template in templates:
        claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]}
        assert claim["metadata"]["name"] in claims
        mounts = {m["mountPath"] for m in _containers(template)[0]["volumeMounts"]}
        assert "/workspace" in mounts


# ----------------------------------------------------------------------------- Docker

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_package_like_the_makefile() -> None:
    instructions = dockerfile_instructions()
    runs = [rest for kw, rest in instructions if kw == "RUN" and "pip install" in rest]
    assert runs, "the Dockerfile installs nothing"
    assert install_args_in(runs[0]) == makefile_install_args()
    copies = [rest for kw, rest in instructions if kw == "COPY"]
    first_install = instructions.index(("RUN", runs[0]))
    copied_before = " ".join(rest for kw, rest in instructions[:first_install] if kw == "COPY")
    # The package metadata and source are in the image before the install runs.
    assert "pyproject.toml" in copied_before and "dltrain/" in copied_before
    assert any("dvc.yaml" in c and "params.yaml" in c for c in copies)


def test_dockerfile_runs_the_stages_through_the_dltrain_entrypoint() -> None:
    instructions = dict(dockerfile_instructions())
    assert instructions["FROM"].startswith("python:3.11")
    assert instructions["ENTRYPOINT"] == '["dltrain"]'
    # The console script the entrypoint names is the one pyproject installs.
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'dltrain = "dltrain.cli:run"' in pyproject


# ----------------------------------------------------------------------------- DVC on S3

def test_s3_remote_is_added_locally_and_the_repo_default_stays(fresh_clone: Path) -> None:
    committed = (fresh_clone / ".dvc" / "config").read_text()
    out = subprocess.run([str(fresh_clone / "infra" / "cloud" / "dvc-s3-remote.sh"),
                          "s3://example-bucket/dltrain/dvc"], capture_output=True, text=True,
                         env=venv_env(), cwd=fresh_clone, timeout=120)
    assert out.returncode == 0, out.stderr
    assert re.search(r"s3remote\s+s3://example-bucket/dltrain/dvc", out.stdout), out.stdout
    assert (fresh_clone / ".dvc" / "config").read_text() == committed
    status = subprocess.run(["git", "status", "--porcelain"], cwd=fresh_clone,
                            capture_output=True, text=True).stdout
    assert status == "", f"the remote leaked into tracked files: {status}"
    default = subprocess.run(["dvc", "remote", "default"], cwd=fresh_clone, env=venv_env(),
                             capture_output=True, text=True).stdout.strip()
    assert default == "local"


def test_s3_remote_script_refuses_a_non_s3_url(fresh_clone: Path) -> None:
    out = subprocess.run([str(fresh_clone / "infra" / "cloud" / "dvc-s3-remote.sh"),
                          "/tmp/not-s3"], capture_output=True, text=True, env=venv_env(),
                         cwd=fresh_clone, timeout=60)
    assert out.returncode == 2 and "usage:" in out.stderr


# ----------------------------------------------------------------------------- make deploy

@pytest.mark.integration
def test_deploy_shows_prefects_error_and_the_api_url_when_the_pool_cannot_be_made(
        tmp_path: Path) -> None:
    """`make deploy` against an API nothing answers at: Prefect's own message and the URL it
    used (its credentials left out), not a bare `Error 1`."""
    import socket

    with socket.socket() as sock:  # a loopback port that was free a moment ago: closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    done = subprocess.run(
        [str(INFRA / "prefect" / "deploy.sh"), "local"], capture_output=True, text=True,
        env=venv_env(PREFECT_API_URL=url.replace("//", "//user:secret@"),
                     PREFECT_HOME=str(tmp_path / "prefect-home")), timeout=180)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert f"could not create work pool dltrain-local at the Prefect API {url}:" in out, out
    assert "ConnectError: All connection attempts failed" in out, out  # Prefect's message
    assert "secret" not in out and "Traceback" not in out, out


# ----------------------------------------------------------------------------- secrets

SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",                                   # AWS access key id
    r"(?i)aws_secret_access_key\s*[:=]\s*\S+",
    r"(?i)(api[_-]?key|password|token)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{16,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
]


def test_no_credentials_in_infra() -> None:
    for path in INFRA.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            text = path.read_text(errors="replace")
            for pattern in SECRET_PATTERNS:
                assert not re.search(pattern, text), f"{path}: matches {pattern}"


# ----------------------------------------------------------------------------- make mlflow-ui

@pytest.mark.integration
def test_make_mlflow_ui_serves_the_embedded_store_and_stops_on_ctrl_c(fresh_clone: Path) -> None:
    """`make mlflow-ui` as a user runs it: it answers on loopback with one web worker and no
    job consumers, and Ctrl-C (SIGINT to the terminal's process group) stops all of it."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    import psutil

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The venv of this checkout stands in for the clone's own (-o: no set-up in the test).
    make = subprocess.Popen(["make", "-s", "-o", ".venv/.dltrain-installed", "-o", "data-package",
                             "mlflow-ui", f"MLFLOW_PORT={port}"], cwd=fresh_clone,
                            env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert make.poll() is None, make.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "no answer within 120 s"
                time.sleep(0.5)
        tree = psutil.Process(make.pid).children(recursive=True)
        commands = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "--workers 1" in commands
        assert not [p for p in tree if "huey" in " ".join(p.cmdline())], commands
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=30)
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, [p.pid for p in alive]
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
