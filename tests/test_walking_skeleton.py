"""The walking skeleton, end to end through real processes, a real pty and a real mosquitto (killed once).

A JBD BMS stub answers on a pty; `battery-agent run` polls it, seals a `health` event into its
SQLite outbox and publishes it; `battery-server run` verifies it against the enrolled key and stores
it; the agent receives the server's signed receipt and prunes its outbox. The broker is killed and
restarted on the way, and the chain stored at the end has no gap and no duplicate.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import envelope, events, keys

from harness.waiting import wait_until

pytestmark = pytest.mark.integration
CODE = "0RJPEA00HAU0AAG1C3000123"
BIN = Path(sys.executable).parent


def cli(name: str, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([str(BIN / name), *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def start(log: Path, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([str(BIN / name), *args], env=env, stderr=out)


def query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []  # not created yet


def closed_beyond(record: Path, seq: int) -> bool:
    """Everything stored up to at least ``seq``, and no hole after the watermark."""
    rows = query(record, "SELECT watermark, max_seq FROM chains")
    return bool(rows) and rows[0][0] >= seq and rows[0][0] == rows[0][1]


def first_unreceipted(outbox: Path) -> float:
    rows = query(outbox, "SELECT MIN(seq) FROM outbox")
    return float("inf") if rows and rows[0][0] is None else (rows[0][0] if rows else 0)


def test_jbd_reading_becomes_a_stored_event_and_a_receipt_prunes_the_outbox(tmp_path, broker):
    env = {**os.environ, "BT_HOME": str(tmp_path / "server-home")}
    device_key = tmp_path / "agent" / "device.key"
    device_key.parent.mkdir()
    cli("battery-agent", "keygen", "--out", str(device_key), env=env)
    server_toml = tmp_path / "server.toml"
    server_toml.write_text(
        f'[store]\nurl = "sqlite:record.sqlite"\n[mqtt]\nport = {broker.port}\n[intake]\nbatch_ms = 10\n'
    )
    cli("battery-server", "init", "-c", str(server_toml), env=env)
    server_pub = cli("battery-server", "pubkey", "-c", str(server_toml), env=env).strip()
    device_pub = str(device_key.with_suffix(".pub"))
    cli(
        "battery-server",
        "devices",
        "enroll",
        "gateway-1",
        "--role",
        "gateway",
        "--key",
        device_pub,
        "-c",
        str(server_toml),
        env=env,
    )

    link = PtyLink(tmp_path / "bms-slot1")
    bms = JbdBms(link, PackState(voltage_v=52.8, current_a=-4.2, soc_pct=62))
    bms.start()

    agent_toml = tmp_path / "agent" / "agent.toml"
    agent_toml.write_text(
        f'[device]\nid = "gateway-1"\nkey = "device.key"\n'
        f'[server]\npublic_key = "{server_pub}"\n'
        f"[mqtt]\nport = {broker.port}\nresend_after_s = 2\n"
        f'[outbox]\npath = "outbox.sqlite"\n'
        f'[site]\nkind = "gateway"\nhealth_interval_s = 0.5\n'
        f'[[slots]]\nslot = 1\ncode = "{CODE.lower()}"\n'
        f'[slots.serial]\nport = "{link.path}"\npoll_interval_s = 0.2\n'
    )
    record, outbox = tmp_path / "record.sqlite", tmp_path / "agent" / "outbox.sqlite"
    server = start(tmp_path / "server.log", "battery-server", "run", "-c", str(server_toml), env=env)
    agent = start(tmp_path / "agent.log", "battery-agent", "run", "-c", str(agent_toml), env=env)
    try:
        wait_until(
            lambda: len(query(record, "SELECT 1 FROM events")) >= 3,
            30,
            "three stored events",
            (server, agent),
        )
        # The receipt covers what is stored: the outbox drains down to at most what is still in flight.
        wait_until(lambda: first_unreceipted(outbox) > 3, 30, "receipts to prune the first events", (server, agent))
        # The broker dies like a power cut and comes back: both sides reconnect by themselves.
        broker.kill()
        before = len(query(record, "SELECT 1 FROM events"))
        time.sleep(1.5)
        broker.start()
        # Events the dying broker had acknowledged but not delivered are sent again (no receipt came):
        # the watermark, the contiguous stored prefix, must pass everything sealed before the outage.
        wait_until(
            lambda: closed_beyond(record, before + 3), 30, "the chain to close after the restart", (server, agent)
        )
    finally:
        for p in (agent, server):
            p.send_signal(signal.SIGTERM)
        for p in (agent, server):
            p.wait(timeout=20)
        bms.stop()
        link.close()
    assert agent.returncode == 0 and server.returncode == 0

    rows = query(record, "SELECT seq, envelope, device FROM events ORDER BY seq")
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))  # in order, no gap, nothing twice
    device_public = keys.load_private(device_key).public
    prev = events.ZERO_HASH
    for seq, raw, device in rows:
        env_ = envelope.verify(raw, device_public)  # the stored bytes are the signed bytes
        ev = events.decode(env_.payload)
        assert (ev.device, ev.seq, ev.prev, ev.type, ev.source) == (device, seq, prev, "health", "label")
        prev = env_.hash
    first = events.decode(envelope.decode(rows[0][1]).payload)
    assert first.fields["code"] == CODE and first.fields["slot"] == 1
    health = first.fields["health"]
    assert health["voltage_v"] == 52.8 and health["current_a"] == -4.2 and health["soc_pct"] == 62
    assert len(health["cells_v"]) == 16 and health["temps_c"] == [24.5, 25.1]
    assert query(record, "SELECT COUNT(*) FROM quarantine") == [(0,)]
    assert query(record, "SELECT watermark FROM chains")[0][0] >= 3
    head = query(outbox, "SELECT last_seq FROM chain")[0][0]
    assert head >= len(rows)
    listed = json.loads(cli("battery-server", "devices", "list", "--json", "-c", str(server_toml), env=env))
    assert listed[0]["device"] == "gateway-1" and listed[0]["watermark"] == len(rows)
