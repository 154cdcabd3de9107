"""The data stages through real DVC in a fresh clone: `dvc repro download preprocess` builds
data/raw and data/processed, and a second repro runs the freshness check and nothing else; a
source directory whose files change is downloaded, preprocessed and trained on again."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dltrain.atomic import read_json
from dltrain.data.datasets import DEBIAN_FASHION_MNIST_DIR

from helpers.data import RAW_FILES, write_raw_dir
from helpers.repo import make_clone, venv_env

pytestmark = pytest.mark.integration

DATA_STAGES = ["download", "preprocess"]  # by name: other stages of dvc.yaml are not ours


def repro(clone: Path, *stages: str) -> str:
    proc = subprocess.run(["dvc", "repro", *stages], cwd=clone, env=venv_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def stages_run(output: str) -> list[str]:
    """The stages DVC started, in order (read from its output, in a test only)."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def set_params(clone: Path, changes: dict[str, dict]) -> None:
    params_path = clone / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_dvc_repro_runs_the_data_stages_then_finds_them_up_to_date(fresh_clone: Path,
                                                                   tmp_path: Path):
    source = write_raw_dir(tmp_path / "mirror", n_train=300, n_test=100)
    params_path = fresh_clone / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["data"]["source"] = source.as_uri()
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    first = repro(fresh_clone, *DATA_STAGES)
    assert "Running stage 'download'" in first and "Running stage 'preprocess'" in first
    raw, processed = fresh_clone / "data" / "raw", fresh_clone / "data" / "processed"
    manifest = read_json(raw / "manifest.json")
    assert manifest["source"] == source.as_uri()
    summary = read_json(processed / "summary.json")
    assert summary["dataset"] == params["data"]["dataset"]
    assert summary["data_checksum"] == manifest["checksum"]
    assert summary["train"]["n"] + summary["val"]["n"] == 300
    assert summary["test"]["n"] == 100
    lock = yaml.safe_load((fresh_clone / "dvc.lock").read_text())
    assert set(DATA_STAGES) <= set(lock["stages"])
    before = {"raw": digests(raw), "processed": digests(processed)}

    second = repro(fresh_clone, *DATA_STAGES)
    assert stages_run(second) == ["check"]  # the freshness check runs every time, alone
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second
    assert {"raw": digests(raw), "processed": digests(processed)} == before
    # No staging directory was left beside the outputs.
    assert sorted(p.name for p in (fresh_clone / "data").iterdir()
                  if not p.name.startswith(".gitignore")) == ["processed", "raw", "source.json"]
    # data/source.json is the check's, git-ignored: the clone stays clean for git.
    status = subprocess.run(["git", "status", "--porcelain", "--ignored", "data"],
                            cwd=fresh_clone, capture_output=True, text=True, check=True).stdout
    assert "!! data/source.json" in status.splitlines()


@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST_DIR).is_dir(),
                    reason=f"{DEBIAN_FASHION_MNIST_DIR} (Debian's dataset-fashion-mnist) missing")
def test_offline_debian_copy_a_no_op_repro_runs_only_the_check(fresh_clone: Path):
    """The default source (the known mirrors, Debian's copy first): unchanged by definition,
    so the check reads no data file and the download is not re-run."""
    set_params(fresh_clone, {"data": {"source": None}})
    assert stages_run(repro(fresh_clone, *DATA_STAGES)) == ["check", *DATA_STAGES]
    raw = digests(fresh_clone / "data" / "raw")
    start = time.monotonic()
    again = repro(fresh_clone, *DATA_STAGES)
    took = time.monotonic() - start
    print(f"\nno-op `dvc repro {' '.join(DATA_STAGES)}` (Debian copy): {took:.2f} s")
    assert stages_run(again) == ["check"]
    assert "unchanged" in again and digests(fresh_clone / "data" / "raw") == raw


# --- a source directory that changes: the scenario, through training --------------

# Local mode: these tests are about what DVC re-runs, not about Ray.
TINY_TRAIN = {"epochs": 1, "num_workers": 0, "batch_size": 64}


@pytest.fixture(scope="module")
def trained_clone(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A clone whose data.source is a directory of 400 training images, run up to train."""
    root = tmp_path_factory.mktemp("fresh")
    clone = make_clone(root / "clone")
    source = write_raw_dir(root / "source", n_train=400, n_test=100, seed=1)
    set_params(clone, {"data": {"source": str(source)}, "train": TINY_TRAIN})
    first = repro(clone, "train")
    assert stages_run(first) == ["check", "download", "preprocess", "train"], first
    return clone, source


def outputs(clone: Path) -> dict[str, dict[str, str]]:
    return {"raw": digests(clone / "data" / "raw"),
            "processed": digests(clone / "data" / "processed"),
            "models": digests(clone / "models"),
            "training": digests(clone / "reports"),
            "lock": {"dvc.lock": hashlib.sha256((clone / "dvc.lock").read_bytes()).hexdigest()}}


def test_an_unchanged_source_runs_nothing_after_the_check(trained_clone: tuple[Path, Path]):
    clone, source = trained_clone
    before = outputs(clone)
    again = repro(clone, "train")
    assert stages_run(again) == ["check"]
    assert "unchanged" in again
    assert outputs(clone) == before
    # Touched, not changed (a copy that kept the bytes): hashed again, still unchanged.
    for name in RAW_FILES.values():
        st = (source / name).stat()
        os.utime(source / name, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    assert stages_run(repro(clone, "train")) == ["check"]
    assert outputs(clone) == before


def test_a_changed_source_directory_is_downloaded_preprocessed_and_trained_on_again(
        trained_clone: tuple[Path, Path], tmp_path: Path):
    """The training files of the source are replaced by a different set of 300 images: the
    next `dvc repro` fetches those two files (the test files are kept), preprocesses and
    trains on the new data."""
    clone, source = trained_clone
    before = outputs(clone)
    other = write_raw_dir(tmp_path / "other", n_train=300, n_test=100, seed=2)
    for key in ("train_images", "train_labels"):
        shutil.copyfile(other / RAW_FILES[key], source / RAW_FILES[key])

    out = repro(clone, "train")
    assert stages_run(out) == ["check", "download", "preprocess", "train"], out
    assert out.count("unchanged at the source; kept") == 2  # the test files
    assert "fetched 2 of 4 files" in out
    summary = read_json(clone / "data" / "processed" / "summary.json")
    assert summary["train"]["n"] + summary["val"]["n"] == 300
    after = outputs(clone)
    assert after["raw"] != before["raw"] and after["models"] != before["models"]
    assert read_json(clone / "reports" / "training.json")["epochs"]
    for key in ("train_images", "train_labels"):
        name = RAW_FILES[key]
        assert (clone / "data" / "raw" / name).read_bytes() == (source / name).read_bytes()
    # And once more: nothing new, nothing after the check.
    assert stages_run(repro(clone, "train")) == ["check"]


def test_evaluate_reports_read_well_in_dvc(trained_clone: tuple[Path, Path]):
    """`dvc metrics show` of the evaluated model fits a 100-column terminal (the per-class
    figures are in reports/per_class.json, a plot), and `dvc plots show` renders every plot
    dvc.yaml declares, the offline training curves PNG among them."""
    clone, _source = trained_clone
    assert stages_run(repro(clone, "evaluate")) == ["check", "evaluate"]
    env = venv_env(COLUMNS="100")
    shown = subprocess.run(["dvc", "metrics", "show"], cwd=clone, env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    print("\n" + shown.stdout)
    assert len(lines) == 2 and lines[1].startswith("reports/metrics.json"), shown.stdout
    assert max(len(line) for line in lines) <= 100, shown.stdout
    assert lines[0].split() == ["Path", "accuracy", "loss", "macro_f1", "n", "test_sha256",
                                "weights_sha256"]
    plots = subprocess.run(["dvc", "plots", "show", "--json"], cwd=clone, env=env,
                           capture_output=True, text=True, timeout=120)
    assert plots.returncode == 0, plots.stderr
    rendered = json.loads(plots.stdout)
    assert not rendered.get("errors"), rendered["errors"]
    for name in ("reports/per_class.json", "reports/training_curves.png",
                 "reports/confusion_matrix.png"):
        assert name in rendered["data"], sorted(rendered["data"])


def test_dvc_plots_show_draws_offline(trained_clone: tuple[Path, Path], tmp_path: Path):
    """The page `dvc plots show` writes loads no script from the network: .dvc/config names
    DVC's `plots.html_template`, .dvc/plots/offline.html, which inlines Vega, Vega-Lite and
    Vega-Embed, so the curves are drawn offline rather than left as blank frames. The page
    holds the plots' data (the epochs of reports/training.json) and the PNGs too."""
    clone, _source = trained_clone
    repro(clone, "evaluate")
    out = tmp_path / "plots"
    shown = subprocess.run(["dvc", "plots", "show", "-o", str(out)], cwd=clone, env=venv_env(),
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    page = (out / "index.html").read_text()
    assert not re.findall(r"<script[^>]*\bsrc=", page), "a script is loaded from elsewhere"
    assert "cdn.jsdelivr.net" not in page
    for library in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert f"/* {library}: build/" in page, library
    assert page.count("vegaEmbed(") >= 4  # Loss, Accuracy, F1 per class, confusion matrix
    epoch = read_json(clone / "reports" / "training.json")["epochs"][0]
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert f'"{key}": {json.dumps(epoch[key])}' in page, key
    for png in ("training_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert re.search(rf"<img[^>]+{re.escape(png)}", page), png
