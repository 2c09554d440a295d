"""The record's command line as operators and auditors use it: human output, --json, exit codes."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from battery_trace.protocol import keys
from battery_trace.server.store import Store

from tests.world import DAY, T0, World

BIN = Path(sys.executable).parent
PACK, PACK_B = "0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124"
VIN = "LNBSCB3F1PW123456"


@pytest.fixture
def home(tmp_path):
    """A record with one battery's life in it, in the default embedded store of $BT_HOME."""
    store = Store(f"sqlite:{tmp_path / 'record.sqlite'}")
    world = World(store)
    maker, station = world.device("maker-1", "vehicle_maker"), world.device("station-1", "swap_operator")
    scrapper = world.device("scrap-1", "scrapper")
    world.send(maker, "installed", {"code": PACK, "vin": VIN}, T0)
    world.send(maker, "installed", {"code": PACK_B, "vin": VIN}, T0)
    world.send(station, "health", {"code": PACK, "health": {"soc_pct": 90, "voltage_v": 352.1}}, T0 + DAY)
    world.send(station, "health", {"code": PACK, "health": {"soc_pct": 40, "voltage_v": 340.0}}, T0 + 2 * DAY)
    world.send(scrapper, "vehicle_scrapped", {"vin": VIN, "codes": [PACK]}, T0 + 3 * DAY)
    store.close()
    return tmp_path


def run(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "battery-server"), *args], capture_output=True, text=True, timeout=60, env={"BT_HOME": str(home)}
    )


def test_trace_tells_the_story_and_exits_1_for_an_unknown_battery(home):
    done = run(home, "trace", PACK.lower())
    assert done.returncode == 0, done.stderr
    assert "retired" in done.stdout and "installed" in done.stdout and "into " + VIN in done.stdout
    assert "soc_pct 90 -> 40" in done.stdout
    as_json = json.loads(run(home, "trace", PACK, "--json").stdout)
    assert [e["type"] for e in as_json["events"]] == ["installed", "health", "health", "vehicle_scrapped"]
    assert as_json["state"] == "retired"
    missing = run(home, "trace", "0RJPEA00HAU0AAG1C3009999")
    assert missing.returncode == 1 and "no event" in missing.stderr


def test_vehicle_and_findings(home):
    vehicle = json.loads(run(home, "vehicle", VIN, "--json").stdout)
    assert vehicle["state"] == "scrapped" and [f["kind"] for f in vehicle["findings"]] == ["incomplete_scrapping"]
    text = run(home, "findings", "--open").stdout
    assert "incomplete_scrapping" in text and PACK_B in text
    only = json.loads(run(home, "findings", "--kind", "late_report", "--json").stdout)
    assert only == []
    assert run(home, "findings", "--kind", "nonsense").returncode == 2


def test_device_view_and_audit(home):
    device = json.loads(run(home, "device", "station-1", "--json").stdout)
    assert device["chain"] == "intact" and device["keys"][0]["watermark"] == 2
    audit = run(home, "audit", "station-1")
    assert audit.returncode == 0 and "2 envelopes re-verified" in audit.stdout and "intact" in audit.stdout
    with sqlite3.connect(home / "record.sqlite") as db:  # someone edits the record behind our back
        (raw,) = db.execute("SELECT envelope FROM events WHERE device = 'station-1' AND seq = 2").fetchone()
        # Flip a bit of the signature's last byte: overwriting it with a constant would be a no-op whenever the
        # byte already held it (Ed25519's S < 2**253, so its top byte is 0x00 about one time in sixteen).
        tampered = raw[:-1] + bytes([raw[-1] ^ 0x01])
        db.execute("UPDATE events SET envelope = ? WHERE device = 'station-1' AND seq = 2", (tampered,))
    broken = run(home, "audit", "station-1", "--json")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["keys"][0]["first_break"]["seq"] == 2
    assert run(home, "audit", "nobody").returncode == 1


def test_rejects_and_export(home):
    assert "no rejected messages" in run(home, "rejects").stdout
    jsonl = run(home, "export", "--since", "2020-01-01", "--until", "2100-01-01")
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(rows) == 5 and "exported 5 events" in jsonl.stderr
    assert {r["type"] for r in rows} == {"installed", "health", "vehicle_scrapped"}
    out = home / "x.csv"
    done = run(
        home,
        "export",
        "--since",
        "2026-01-02",
        "--until",
        "2026-01-03T12:00:00Z",
        "--by",
        "time",
        "--format",
        "csv",
        "--out",
        str(out),
    )
    assert done.returncode == 0
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["type"] for r in table] == ["health", "health"] and json.loads(table[0]["fields"])["code"] == PACK
    assert run(home, "export", "--since", "2026-02-01", "--until", "2026-01-01").returncode == 2
    assert run(home, "export", "--since", "yesterday-ish", "--until", "2026-01-01").returncode == 2


def test_rotate_and_revoke(home):
    new = keys.generate().public.hex
    rotated = run(home, "devices", "rotate", "station-1", "--key", new, "--json")
    assert rotated.returncode == 0 and json.loads(rotated.stdout)["state"] == "active"
    assert run(home, "devices", "rotate", "nobody", "--key", keys.generate().public.hex).returncode == 1
    revoked = run(home, "devices", "revoke", "station-1", "--at", "2026-01-01T12:00:00Z")
    assert revoked.returncode == 0 and "2 stored events" in revoked.stdout
    states = {
        d["key_state"] for d in json.loads(run(home, "devices", "list", "--json").stdout) if d["device"] == "station-1"
    }
    assert states == {"revoked"}
    assert run(home, "devices", "revoke", "ffff").returncode == 1
