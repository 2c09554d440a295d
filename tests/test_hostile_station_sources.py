"""The station's reality, at its sources and its disk: real `battery-agent run` processes against the
repository's own stubs (slcan adapters and JBD BMSs on ptys, a label scanner), each fault as a field
engineer meets it.

- One bad line never kills a reader: truncated and garbled slcan lines are counted, the bus goes on.
- A silent adapter, or a bus that only carries frames the agent cannot decode, is named in /healthz.
- A partial serial line does not survive a replug to eat the next line.
- The disk budget thins each slot fairly, alarms above 100 %, and recovers once receipts prune.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from battery_trace.agent.outbox import Outbox
from battery_trace.agent.sealer import Draft, Sealer
from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.can_slot import CanSlot
from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
from battery_trace.firmware_stubs.line_device import LineDevice
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import envelope, events, keys

from harness import agents
from harness.waiting import wait_until
from tests.conftest import GATEWAY_CODE

pytestmark = [pytest.mark.hostile, pytest.mark.integration]

CODE_2 = "0RJPEA00HAU0AAG1C3000124"


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:  # not listening yet
        return 0, ""


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        return response.read().decode()


def source(status: dict | None, prefix: str) -> dict:
    """The first source whose name starts with ``prefix`` ({} while the agent does not answer yet)."""
    return next((s for s in (status or {}).get("sources", []) if s["name"].startswith(prefix)), {})


def frames(port: int, prefix: str = "can:") -> int:
    status = agents.status(port)
    return source(status, prefix).get("counters", {}).get("frames", 0)


class Site:
    """A gateway agent process on the test's broker, with whatever slots ``body`` configures."""

    def __init__(
        self,
        tmp_path: Path,
        broker,
        body: str,
        server_hex: str | None = None,
        key: Path | None = None,
        budget_mb: float | None = None,
        **kw,
    ) -> None:
        if key is None:
            key = tmp_path / "gw.key"
            keys.save_private(keys.generate(), key)
        self.key = key
        self.outbox = tmp_path / "gw-1-outbox.sqlite"
        self.log = tmp_path / "agent.log"
        server_hex = server_hex or keys.generate().public.hex
        kw.setdefault("health_interval_s", 0.2)
        self.config, self.port = agents.write_config(
            tmp_path / "gw.toml", "gw-1", key, server_hex, broker, "gateway", body, role="gateway", **kw
        )
        if budget_mb is not None:
            text = self.config.read_text().replace("[outbox]\n", f"[outbox]\nbudget_mb = {budget_mb}\n", 1)
            self.config.write_text(text)
        self.process = None

    def start(self) -> Site:
        self.process = agents.start(self.config, self.log)
        return self

    def stop(self) -> None:
        if self.process is not None:
            agents.stop(self.process)

    def wait(self, condition, what: str, timeout: float = 30) -> float:
        return wait_until(condition, timeout, f"{what}\n--- agent log ---\n{self.log_tail()}", [self.process])

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def can_body(slot: CanSlot, code: str = GATEWAY_CODE) -> str:
    return (
        f'[[slots]]\nslot = 1\ncode = "{code}"\n[slots.can]\ninterface = "slcan"\nchannel = "{slot.path}"\n'
        'bitrate = 250000\nprotocol = "gbt27930"\n[slots.can.options]\nsleep_after_open = 0\n'
    )


@pytest.fixture
def can_site(tmp_path, broker):
    slot = CanSlot(tmp_path / "can-slot1")
    slot.insert(gbt27930_bms.Pack())
    site = Site(tmp_path, broker, can_body(slot), extra_site="absent_after_s = 2\n").start()
    site.wait(lambda: frames(site.port) > 50, "frames from the slcan adapter")
    yield site, slot
    site.stop()
    slot.close()


# Lines python-can's slcan parser cannot take: cut short (IndexError), not hex (ValueError), not ASCII
# (its buffer keeps the bytes, so only a reopen clears it). The first killed the reader for good while
# the source still said "connected", and the slot turned "removed".
BAD_LINES = [b"T12\r", b"T1234\r", b"TZZZZZZZZ8\r", b"t1\r", b"\xff\xfe\r"]


def test_a_truncated_slcan_line_is_counted_and_the_bus_goes_on(can_site):
    site, slot = can_site
    for line in BAD_LINES:
        assert slot.adapter.send_raw(line)
    before = frames(site.port)
    site.wait(lambda: frames(site.port) > before + 200, "frames after the bad lines (the reader must live on)")
    status = agents.status(site.port)
    can = source(status, "can:")
    assert can["connected"] and can["counters"]["unreadable_frames"] == len(BAD_LINES)
    assert status["slots"]["1"]["occupied"], status["slots"]
    assert healthz(site.port)[0] == 200
    assert 'what="unreadable_frames"' in metrics(site.port)


def test_a_silent_adapter_is_named_in_healthz_and_recovers(can_site):
    site, slot = can_site
    assert healthz(site.port) == (200, "ok\n")
    slot.adapter.mute()
    site.wait(lambda: healthz(site.port)[0] == 503, "/healthz to report the silent adapter")
    _, text = healthz(site.port)
    assert f"can:slcan:{slot.path}" in text and "silent" in text, text
    assert "bt_agent_source_silent_seconds" in metrics(site.port)
    slot.adapter.mute(False)
    site.wait(lambda: healthz(site.port) == (200, "ok\n"), "/healthz to recover when frames come back")


def test_can_decode_errors_reach_metrics_and_healthz(can_site):
    """A bus that carries only frames the agent cannot decode (11-bit ids on a GB/T 27930 slot: a
    wrongly wired or wrongly configured bus) is as silent as a dead one, and /healthz says what came."""
    site, slot = can_site
    slot.remove()
    stop = time.monotonic() + 30

    def noisy_bus() -> bool:
        slot.adapter.send(0x123, b"\x01\x02", extended=False)
        return healthz(site.port)[0] == 503 or time.monotonic() > stop

    site.wait(noisy_bus, "/healthz to name a bus of undecodable frames")
    code, text = healthz(site.port)
    assert code == 503 and "not_j1939" in text, text
    assert f'bt_agent_source_decode_errors_total{{reason="not_j1939",slot="1",source="can:slcan:{slot.path}"}}' in (
        metrics(site.port)
    )


def test_a_partial_line_before_a_replug_does_not_eat_the_next_line(tmp_path, broker):
    """A scanner sends half a label, is unplugged and plugged in again, and scans the label whole:
    the half line died with the old port; the whole line is the code."""
    bms_link = PtyLink(tmp_path / "bms")
    bms = JbdBms(bms_link, PackState())
    bms.start()
    scanner = LineDevice(PtyLink(tmp_path / "scanner"))
    body = (
        f'[[slots]]\nslot = 1\n[slots.serial]\nport = "{bms_link.path}"\nprotocol = "jbd"\n'
        f'poll_interval_s = 0.1\ntimeout_s = 0.3\n[[scanners]]\nslot = 1\nport = "{scanner.link.path}"\n'
    )
    site = Site(tmp_path, broker, body).start()
    try:
        site.wait(lambda: source(agents.status(site.port), "serial:scanner").get("connected"), "the scanner's port")
        scanner.noise(GATEWAY_CODE[:10].encode())
        time.sleep(0.5)  # the agent has read the half line
        scanner.link.unplug()
        site.wait(lambda: not source(agents.status(site.port), "serial:scanner").get("connected"), "the unplug")
        scanner.link.plug()
        site.wait(lambda: source(agents.status(site.port), "serial:scanner").get("connected"), "the replug")
        scanner.send(GATEWAY_CODE)
        site.wait(
            lambda: agents.status(site.port)["slots"].get("1", {}).get("code") == GATEWAY_CODE,
            "the scanned code on slot 1",
        )
        counters = source(agents.status(site.port), "serial:scanner")["counters"]
        assert not any(k.startswith("bad_frame") for k in counters), counters
    finally:
        site.stop()
        bms.stop()
        bms_link.close()
        scanner.link.close()


def live_bytes(path: Path) -> int:
    """Bytes the outbox's rows take: its pages in use (what pruning frees), measured here on its own."""
    db = sqlite3.connect(path)
    try:
        pages, free, size = (
            db.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_count", "freelist_count", "page_size")
        )
        return (pages - free) * size
    finally:
        db.close()


def file_bytes(path: Path) -> int:
    """What the outbox takes on disk: the database file and its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def backlog(outbox_path: Path, key: Path, until_live: int) -> int:
    """An outage's backlog, sealed with the device's own key before the agent starts; returns its head."""
    outbox = Outbox(outbox_path)
    sealer = Sealer(outbox, keys.load_private(key), "gw-1")
    fields = {"code": CODE_2, "health": {"voltage_v": 52.8, "soc_pct": 62, "cells_v": [3.3] * 16}, "slot": 9}
    head = 0
    while head % 200 or live_bytes(outbox_path) < until_live:
        head = sealer.seal(Draft("health", "label", fields))
    outbox.close()
    return head


def health_per_slot(outbox_path: Path, after: int) -> dict[int, int]:
    db = sqlite3.connect(outbox_path)
    rows = db.execute("SELECT envelope FROM outbox WHERE seq > ? AND type = 'health'", (after,)).fetchall()
    db.close()
    counts: dict[int, int] = {}
    for (raw,) in rows:
        slot = events.decode(envelope.decode(raw).payload).fields["slot"]
        counts[slot] = counts.get(slot, 0) + 1
    return counts


def jbd_slots(tmp_path: Path, codes: list[str]) -> tuple[str, list]:
    """A config body with one JBD BMS per code (each its own pack and model), and the stubs' closers."""
    body, closers = "", []
    for n, code in enumerate(codes, start=1):
        link = PtyLink(tmp_path / f"bms{n}")
        bms = JbdBms(link, PackState(model=f"JBD-TEST-{n}", soc_pct=50 + n))
        bms.start()
        closers += [bms.stop, link.close]
        body += (
            f'[[slots]]\nslot = {n}\ncode = "{code}"\n[slots.serial]\nport = "{link.path}"\nprotocol = "jbd"\n'
            "poll_interval_s = 0.1\ntimeout_s = 0.3\n"
        )
    return body, closers


def test_thinning_keeps_one_snapshot_in_four_of_every_slot(tmp_path, broker):
    """In the thinning band (80-100 % of the budget) each slot keeps its share: a counter shared by all
    slots kept every fourth draft, which at a steady tick order is always the same slots'."""
    key = tmp_path / "gw.key"
    keys.save_private(keys.generate(), key)
    body, closers = jbd_slots(tmp_path, [GATEWAY_CODE, CODE_2])
    site = Site(tmp_path, broker, body, key=key, budget_mb=1)
    head = backlog(site.outbox, key, until_live=880_000)
    site.start()
    try:
        site.wait(
            lambda: (agents.status(site.port) or {}).get("sealer", {}).get("refused", {}).get("thinned", 0) > 40,
            "health snapshots thinned in the 80-100 % band",
        )
        per_slot = health_per_slot(site.outbox, head)
        assert set(per_slot) == {1, 2} and min(per_slot.values()) * 2 >= max(per_slot.values()) - 2, per_slot
        assert healthz(site.port)[0] in (200, 503)
    finally:
        site.stop()
        for close in closers:
            close()


def test_after_an_outage_the_budget_alarms_and_recovers_once_receipts_prune(tmp_path, record_server):
    """A gateway comes back from a long outage over its budget: it says so (/healthz, /metrics) while
    snapshots are refused, and once the backlog is receipted the space is reclaimed on disk and every
    snapshot is sealed again."""
    key = record_server.device("gw-1", "gateway")
    body, closers = jbd_slots(tmp_path, [GATEWAY_CODE])
    site = Site(tmp_path, record_server.broker, body, server_hex=record_server.public.hex, key=key, budget_mb=1)
    record_server.stop_collector()
    head = backlog(site.outbox, key, until_live=1_150_000)
    site.start()
    try:
        site.wait(
            lambda: healthz(site.port)[0] == 503 and "over its disk budget" in healthz(site.port)[1],
            "/healthz to say the outbox is over its budget",
        )
        assert "bt_agent_outbox_alarm 1" in metrics(site.port)
        on_disk = file_bytes(site.outbox)
        record_server.start_collector()
        site.wait(lambda: len(record_server.events()) >= head, "the backlog stored", timeout=120)
        site.wait(lambda: healthz(site.port) == (200, "ok\n"), "/healthz ok once the backlog is receipted", 60)
        thinned = agents.status(site.port)["sealer"]["refused"].get("thinned", 0)
        sealed = agents.status(site.port)["sealer"]["sealed"]
        site.wait(lambda: agents.status(site.port)["sealer"]["sealed"] >= sealed + 10, "snapshots sealed again")
        assert agents.status(site.port)["sealer"]["refused"].get("thinned", 0) == thinned
        assert file_bytes(site.outbox) < on_disk / 2, (file_bytes(site.outbox), on_disk)
    finally:
        site.stop()
        for close in closers:
            close()


@pytest.mark.hostile
def test_an_outbox_from_an_older_agent_gives_pruned_space_back_too(tmp_path):
    """Outboxes made before incremental vacuum are converted once, at open, with every event kept."""
    from battery_trace.agent.outbox import SCHEMA

    key = tmp_path / "gw.key"
    keys.save_private(keys.generate(), key)
    sealed = tmp_path / "sealed.sqlite"
    head = backlog(sealed, key, until_live=1_100_000)
    path = tmp_path / "old-outbox.sqlite"  # the same rows in a file as older agents made it
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    db.execute("ATTACH ? AS sealed", (str(sealed),))
    db.execute("INSERT INTO outbox SELECT * FROM sealed.outbox")
    db.execute("INSERT INTO chain SELECT * FROM sealed.chain")
    assert db.execute("PRAGMA main.auto_vacuum").fetchone()[0] == 0
    db.close()
    outbox = Outbox(path)
    try:
        kid = keys.load_private(key).public.kid
        last = outbox.pending(limit=10**6)[-1]
        assert (outbox.head(kid), last.seq, outbox.depth()[0]) == (head, head, head)
        assert outbox.prune(kid, head, envelope.envelope_hash(last.envelope)) == head
        assert file_bytes(path) < 100_000 and outbox.size_bytes() < 100_000
    finally:
        outbox.close()
