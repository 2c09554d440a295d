"""Shared fixtures. Integration tests need real services: when CI is set they fail, never skip, if one is missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from harness.broker import Broker, BrokerUnavailable
from harness.postgres import PostgresCluster, PostgresUnavailable

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def missing_service(what: str, why: object) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required when CI is set, and it is missing: {why}")
    pytest.skip(f"{what} unavailable: {why}")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private mosquitto on a free port, killed and restartable by the test."""
    try:
        b = Broker(tmp_path / "broker").start()
    except BrokerUnavailable as exc:
        missing_service("mosquitto", exc)
    yield b
    b.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL cluster for the test run; each test gets its own database in it."""
    import tempfile

    # Not under pytest's tmp_path: its parent folders are private to root, and the cluster may run as postgres.
    workdir = Path(tempfile.mkdtemp(prefix="bt-pg-"))
    try:
        cluster = PostgresCluster(workdir).init().start()
    except PostgresUnavailable as exc:
        missing_service("PostgreSQL (initdb, pg_ctl)", exc)
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on both backends: SQLite in a temporary folder, PostgreSQL in a private database."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'record.sqlite'}"
    return request.getfixturevalue("postgres_cluster").create_database()
