"""Shared fixtures: tiny synthetic data sets and fresh clones of the working tree. The code
behind them, and everything else the tests share, is in the helpers package."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.data import make_processed, write_raw_dir
from helpers.repo import make_clone


@pytest.fixture
def tiny_source(tmp_path: Path) -> Path:
    """A directory holding the four gzipped IDX files of a tiny synthetic data set."""
    return write_raw_dir(tmp_path / "source")


@pytest.fixture(scope="session")
def tiny_source_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_raw_dir(tmp_path_factory.mktemp("source"))


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """A git clone of the working tree (uncommitted changes included), as a new user gets it:
    the tracked files plus the untracked, non-ignored ones."""
    return make_clone(tmp_path / "clone")


@pytest.fixture(scope="session")
def processed_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace holding tiny processed data (shared: tests must not write into it)."""
    return make_processed(tmp_path_factory.mktemp("processed"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server and database for every test of the session that runs the
    flow (its start-up is the cost, so it is paid once; a generous timeout for a busy
    machine). Tests share it: each reads back its own flow run's logs and artifacts."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def session_ray():
    """The session's own Ray head (helpers.ray: `ray start --head` on loopback, token
    authentication, a temporary directory), for tests that need a real Ray but do not test
    starting or stopping one: they connect and disconnect (a workspace whose .ray/env names
    it, as `make ray-up` writes it), or that stand beside a user's Ray (this one is it) and
    check it is left alone. Stopped at the session's end, pass or fail. The tests of Ray's own
    lifecycle (a private Ray, a killed worker or driver, the cluster) start their own."""
    from helpers.ray import ray_head

    with ray_head(num_cpus=2, prefix="sr") as head:
        yield head

