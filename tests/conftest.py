"""Shared fixtures. Integration tests need real services: when CI is set they fail, never skip, if one is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from harness.broker import Broker, BrokerUnavailable
from harness.postgres import PostgresCluster, PostgresUnavailable

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


FAULTS_KEY = pytest.StashKey[list]()  # what each fault-injection case measured


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = config.stash.get(FAULTS_KEY, [])
    if rows:
        terminalreporter.section("fault injection: recovery")
        for row in rows:
            rest = ", ".join(f"{k} {round(v, 2) if isinstance(v, float) else v}" for k, v in row.items() if k != "case")
            terminalreporter.write_line(f"{row['case']}: {rest}")


NOT_BUILT = "not built (`pip install` builds it where a C compiler is present)"


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


@contextlib.contextmanager
def private_cluster(prefix: str) -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of its own, which its user may stop and restart; removed afterwards."""
    # Not under pytest's tmp_path: its parent folders are private to root, and the cluster may run as postgres.
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        cluster = PostgresCluster(workdir).init().start()
    except PostgresUnavailable as exc:
        missing_service("PostgreSQL (initdb, pg_ctl)", exc)
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL cluster for the test run; each test gets its own database in it."""
    with private_cluster("bt-pg-") as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on both backends: SQLite in a temporary folder, PostgreSQL in a private database."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'record.sqlite'}"
    return request.getfixturevalue("postgres_cluster").create_database()


class RecordServer:
    """A collector process on a private broker, its SQLite record, and helpers to enrol devices."""

    def __init__(self, workdir: Path, broker: Broker) -> None:
        from battery_trace.protocol import keys
        from battery_trace.server.store import Store

        from harness import collectors

        self.workdir = workdir
        self.broker = broker
        self.url = f"sqlite:{workdir / 'record.sqlite'}"
        self.store = Store(self.url)
        self.key_path = workdir / "server.key"
        keys.save_private(keys.generate(), self.key_path)
        self.public = keys.load_private(self.key_path).public
        self.config = collectors.write_config(
            workdir / "collector.toml", self.url, broker, "collector-1", self.key_path
        )
        self.log = workdir / "collector.log"
        self.start_collector()

    def start_collector(self) -> None:
        """Start the collector process (again, after stop_collector: same config, log and record)."""
        from harness import collectors

        confirmed = self.log.read_text().count("subscribed to") if self.log.exists() else 0
        self.process = collectors.start(self.config, self.log)
        collectors.wait_subscribed(self.log, after=confirmed)

    def stop_collector(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=20)

    def device(self, name: str, role: str) -> Path:
        """Enrol a new device; returns the path of its private key."""
        from battery_trace.protocol import keys

        key = keys.generate()
        path = self.workdir / f"{name}.key"
        keys.save_private(key, path)
        self.store.enroll(name, role, key.public, None, 0.0)
        return path

    def events(self, event_type: str | None = None) -> list:
        from battery_trace.protocol import envelope, events

        rows = self.store.export(0, 4e12)
        out = [events.decode(envelope.decode(r[9]).payload) for r in rows]
        return [e for e in out if event_type is None or e.type == event_type]

    def stop(self) -> None:
        self.stop_collector()
        self.store.close()


@pytest.fixture
def record_server(tmp_path: Path, broker: Broker) -> Iterator[RecordServer]:
    (tmp_path / "server").mkdir()
    server = RecordServer(tmp_path / "server", broker)
    yield server
    server.stop()


GATEWAY_CODE = "0RJPEA00HAU0AAG1C3000123"


@pytest.fixture
def gateway(tmp_path: Path, record_server: RecordServer) -> Iterator[dict]:
    """A gateway agent polling a JBD BMS on a pty, sealing a health snapshot every 0.2 s."""
    from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
    from battery_trace.firmware_stubs.pty_link import PtyLink

    from harness import agents

    key = record_server.device("gw-1", "gateway")
    link = PtyLink(tmp_path / "bms")
    bms = JbdBms(link, PackState())
    bms.start()
    body = (
        f'[[slots]]\nslot = 1\ncode = "{GATEWAY_CODE}"\n[slots.serial]\nport = "{link.path}"\nprotocol = "jbd"\n'
        "poll_interval_s = 0.1\ntimeout_s = 0.3\n"
    )
    config, port = agents.write_config(
        tmp_path / "gw.toml",
        "gw-1",
        key,
        record_server.public.hex,
        record_server.broker,
        "gateway",
        body,
        role="gateway",
        health_interval_s=0.2,
        resend_after_s=1.0,
    )
    handle = {
        "config": config,
        "port": port,
        "link": link,
        "outbox": tmp_path / "gw-1-outbox.sqlite",
        "log": tmp_path / "agent.log",
        "key": key,
    }
    handle["process"] = agents.start(config, handle["log"])
    yield handle
    agents.stop(handle["process"])
    bms.stop()
    link.close()
