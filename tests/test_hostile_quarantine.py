"""The quarantine cannot be used to slow or fill the server.

Junk keeps coming from anyone who can reach the broker: an oversized message is kept as a bounded
prefix with its size and hash, the quarantine is bounded by age and size with what was dropped
counted, the queries the dashboard runs go through indexes, and the intake's key lookups never
wait behind a reader.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
from pathlib import Path

import pytest
from battery_trace.server import verify
from battery_trace.server.records import Rejected
from battery_trace.server.store import Store
from battery_trace.server.store.retention import QuarantineLimits

from tests.world import DAY, T0, World

pytestmark = pytest.mark.hostile


def junk(size: int, topic: str = "bt/v1/gw-1/events") -> Rejected:
    parsed = verify.parse(topic, os.urandom(size), 64 * 1024)
    assert isinstance(parsed, Rejected)
    return parsed


def test_an_oversized_message_is_kept_as_a_bounded_prefix_with_its_size_and_hash(store_url: str) -> None:
    store = Store(store_url)
    try:
        raw = os.urandom(1_000_000)
        rejected = verify.parse("bt/v1/gw-1/events", raw, 64 * 1024)
        assert isinstance(rejected, Rejected) and rejected.reason == "too_large"
        store.commit([], [rejected], T0 / 1000)
        (row,) = store.rejects()
        assert row["size"] == 1_000_000
        assert row["sha256"] == hashlib.sha256(raw).hexdigest()
        kept = bytes.fromhex(row["raw"])
        assert len(kept) <= 4096 and raw.startswith(kept)
        with store.db.reading() as tx:
            assert tx.value("SELECT SUM(LENGTH(raw)) FROM quarantine") <= 4096
    finally:
        store.close()


def test_a_message_within_the_limit_is_kept_whole_with_its_hash(store_url: str) -> None:
    store = Store(store_url)
    try:
        rejected = junk(60_000)
        store.commit([], [rejected], T0 / 1000)
        (row,) = store.rejects()
        assert bytes.fromhex(row["raw"]) == rejected.raw and row["size"] == 60_000
        assert row["sha256"] == hashlib.sha256(rejected.raw).hexdigest()
    finally:
        store.close()


def test_the_quarantine_is_bounded_by_age_and_size_and_counts_what_it_dropped(store_url: str) -> None:
    limits = QuarantineLimits(max_age_days=30, max_bytes=200_000)
    store = Store(store_url, quarantine=limits)
    try:
        now = T0 / 1000 + 100 * DAY / 1000
        old = [junk(1000, f"bt/v1/old-{i}/events") for i in range(5)]
        store.commit([], old, now - 40 * DAY / 1000)  # beyond the age limit
        for day in range(10):  # 10 x 30 x 1000 bytes: over the size limit
            store.commit([], [junk(1000) for _ in range(30)], now - (10 - day) * 3600)
        store.sweep(now)
        counts = store.counts()
        assert counts["rejected"] == {"malformed": 200}  # the newest 200 KB
        assert counts["quarantine_dropped"] == {"malformed": {"messages": 105, "bytes": 105_000}}
        assert not [r for r in store.rejects(limit=1000) if r["device"].startswith("old-")]
        newest = max(r["received_at"] for r in store.rejects(limit=1000))
        assert newest == pytest.approx(now - 3600)
        store.sweep(now)  # nothing more to drop: the counts stay
        assert store.counts()["quarantine_dropped"]["malformed"]["messages"] == 105
    finally:
        store.close()


def _plan(store: Store, sql: str, params: tuple = ()) -> str:
    with store.db.reading() as tx:
        return "\n".join(str(row[-1]) for row in tx.all(f"EXPLAIN QUERY PLAN {sql}", params))


def test_the_queries_the_dashboard_runs_never_scan_the_quarantine(tmp_path: Path) -> None:
    """Junk rows must not make the devices overview or a device's page slower: no quarantine lookup
    reads the table itself (SQLite's plan says SCAN without USING for that); a bounded quarantine keeps
    the counts by reason, which read an index, bounded too."""
    from battery_trace.server.store import queries

    store = Store(f"sqlite:{tmp_path / 'record.sqlite'}")
    try:
        World(store).device("gw-1", "gateway")
        captured: list[tuple[str, tuple]] = []
        with store.db.reading() as tx:
            original = tx.conn

            class Recorder:
                def execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
                    captured.append((sql, tuple(params)))
                    return original.execute(sql, params)

            tx.conn = Recorder()
            queries.devices_overview(tx)
            queries.device(tx, "gw-1")
            queries.overview(tx, T0 / 1000, 1800, 10)
        quarantine_queries = [(sql, p) for sql, p in captured if "quarantine" in sql]
        assert quarantine_queries
        for sql, params in quarantine_queries:
            plan = _plan(store, sql, params)
            # a whole-table scan (no index at all) is what made every device's row cost the whole quarantine
            scans = [line for line in plan.splitlines() if re.search(r"SCAN (q|quarantine)\b", line)]
            assert all("USING" in line for line in scans), f"{sql}\n{plan}"
    finally:
        store.close()


def test_the_intakes_key_lookups_never_wait_behind_a_reader(tmp_path: Path) -> None:
    """A dashboard query holding the reader connection (a long scan) must not hold up the batch's key
    lookups: the intake reads through a connection of its own."""
    store = Store(f"sqlite:{tmp_path / 'record.sqlite'}")
    try:
        device = World(store).device("gw-1", "gateway")
        holding, release = threading.Event(), threading.Event()

        def dashboard() -> None:
            with store.db.reading():
                holding.set()
                release.wait(30)

        reader = threading.Thread(target=dashboard)
        reader.start()
        assert holding.wait(10)
        looked_up: dict = {}
        lookup = threading.Thread(target=lambda: looked_up.update(store.keys([device.key.public.kid])))
        lookup.start()
        lookup.join(10)
        finished = not lookup.is_alive()
        release.set()
        reader.join()
        lookup.join()
        assert finished, "the key lookup waited for the dashboard's read"
        assert device.key.public.kid in looked_up
    finally:
        store.close()
