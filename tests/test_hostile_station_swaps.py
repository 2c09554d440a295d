"""A swap station as a field engineer meets it: real `battery-agent run` processes, slcan USB-CAN adapters
on ptys with GB/T 27930 BMSs (that send BRM only in their handshake, as real ones do), label scanners,
a PLC that bounces, garbles and loses lines, kill -9 mid-swap, a silent CAN adapter, a real mosquitto
and a real collector. Each test checks what ends up in the record and what the operator is told."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.can_slot import CanSlot
from battery_trace.firmware_stubs.line_device import LineDevice, garbled, with_checksum
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import keys

from harness import agents
from harness.broker import free_port
from harness.waiting import wait_until
from tests.test_hostile_agent import get, retained_status

pytestmark = [pytest.mark.hostile, pytest.mark.integration]
PACK_A, PACK_B, PACK_C, PACK_D = (f"0RJPEA00HAU0AAG1C300012{n}" for n in (3, 4, 5, 6))
VIN_1, VIN_3, VIN_4 = "LNBSCB3F1PW123456", "LNBSCB3FXPW100001", "LNBSCB3F1PW100002"
MISREAD = "LNBSCB3F5PW123456"  # VIN_1 with a wrong check digit


class Station:
    """A swap station's hardware on ptys, and the agent process that runs it."""

    def __init__(self, tmp_path: Path, record_server, slots=(1, 2, 3), identity_wait_s: float = 30) -> None:
        self.tmp = tmp_path
        self.server = record_server
        self.can = {n: CanSlot(tmp_path / f"can-slot{n}") for n in slots}
        self.scanner = {n: LineDevice(PtyLink(tmp_path / f"scanner-slot{n}")) for n in slots}
        plc_link = PtyLink(tmp_path / "plc")
        self.plc = LineDevice(plc_link, ending=b"\n")
        self.plc_checked = LineDevice(plc_link, ending=b"\n", checksum=True)  # the same PLC, with *HH
        key = record_server.device("station-1", "swap_operator")
        body = agents.station_body(tmp_path, slots)
        self.config, self.port = agents.write_config(
            tmp_path / "agent.toml",
            "station-1",
            key,
            record_server.public.hex,
            record_server.broker,
            "swap_station",
            body,
            role="swap_operator",
            health_interval_s=3600,  # no stock snapshots: the record holds only what the swaps sealed
            extra_site=f"absent_after_s = 5\nidentity_wait_s = {identity_wait_s}\n",
        )
        self.outbox = tmp_path / "station-1-outbox.sqlite"
        self.log = tmp_path / "agent.log"
        self.process = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        self.process = agents.start(self.config, self.log)
        wait_until(lambda: agents.status(self.port), 20, "the agent's endpoint", [self.process])
        return self.process

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def status(self) -> dict:
        return agents.status(self.port) or {}

    def workflow(self) -> dict:
        return self.status().get("workflow", {})

    def slot(self, n: int) -> dict:
        return self.status().get("slots", {}).get(str(n), {})

    def stock(self, n: int, code: str, serial: int, soc: float, handshake_once: bool = True) -> None:
        """A charged battery in slot ``n``, its label scanned there (binding its BMS identity)."""
        self.can[n].insert(gbt27930_bms.Pack(serial=serial, soc_pct=soc), handshake_once=handshake_once)
        wait_until(lambda: self.slot(n).get("secondary"), 20, f"slot {n}'s BMS to identify", [self.process])
        self.scanner[n].send(code)
        wait_until(lambda: self.slot(n).get("code") == code, 10, f"slot {n} identified", [self.process])

    def lines(self, *lines: str) -> None:
        for line in lines:
            self.plc.send(line)

    def swaps(self) -> list:
        return self.server.events("swapped")

    def evidence(self) -> list[str]:
        with sqlite3.connect(self.outbox) as db:
            return [row[0] for row in db.execute("SELECT reason FROM swap_evidence ORDER BY at")]

    def close(self) -> None:
        agents.stop(self.process)
        for s in self.can.values():
            s.close()


@pytest.fixture
def station(tmp_path, record_server):
    made: list[Station] = []

    def make(**kwargs) -> Station:
        made.append(Station(tmp_path, record_server, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def alarmed(s: Station, *words: str) -> None:
    """The operator is told everywhere they look: /healthz, /metrics, /status and the retained status."""
    code, health = get(s.port, "/healthz")
    assert code == 503 and all(w in health for w in words), health
    assert "bt_agent_swap_alarm 1" in get(s.port, "/metrics")[1]
    assert all(w in s.status()["bay"]["alarm"] for w in words)
    assert all(w in retained_status(s.server.broker, "station-1")["alarm"] for w in words)


def test_a_kill_9_between_out_and_in_loses_nothing(station):
    """The removed pack identifies itself once (BRM in its handshake) before the crash; after the restart
    its BMS only charges, yet the swap is sealed whole, once."""
    s = station(slots=(1, 2))
    s.stock(1, PACK_A, 0xA1, 90, handshake_once=False)  # stock that keeps announcing itself
    s.lines(f"VEHICLE {VIN_1}", "OUT 2")
    s.can[2].insert(gbt27930_bms.Pack(serial=0xB2, soc_pct=15), handshake_once=True)
    s.scanner[2].send(PACK_B)
    wait_until(lambda: s.slot(2).get("code") == PACK_B, 20, "the removed pack identified", [s.process])
    wait_until(
        lambda: (
            "code_out" in (sqlite3.connect(s.outbox).execute("SELECT state FROM bay").fetchone() or ("",))[0]
            and PACK_B in sqlite3.connect(s.outbox).execute("SELECT state FROM bay").fetchone()[0]
        ),
        10,
        "the bay saved with the removed pack's code",
        [s.process],
    )
    s.kill()
    s.start()
    assert s.status()["bay"]["vehicle"] == VIN_1 and s.status()["bay"]["slot_out"] == 2
    wait_until(lambda: s.slot(1).get("code") == PACK_A, 20, "the stock re-identified by its binding", [s.process])
    s.lines("IN 1")
    s.can[1].remove()
    s.lines("DONE")
    wait_until(s.swaps, 30, "the swap stored", [s.process])
    (swap,) = s.swaps()
    f = swap.fields
    assert (f["vin"], f["code_out"], f["code_in"], f["slot_out"], f["slot_in"]) == (VIN_1, PACK_B, PACK_A, 2, 1)
    assert "unidentified" not in f and f["health_out"]["soc_pct"] < 30
    assert s.workflow()["swaps_resumed"] == 1 and s.workflow()["swaps_sealed"] == 1
    assert get(s.port, "/healthz")[0] == 200


def test_a_kill_9_after_done_resumes_the_wait_for_the_removed_pack(station):
    s = station(slots=(1, 2))
    s.stock(1, PACK_A, 0xA1, 90)
    s.lines(f"VEHICLE {VIN_1}", "OUT 2", "IN 1")
    s.can[1].remove()
    s.lines("DONE")
    wait_until(lambda: s.status()["bay"]["finishing"] == 1, 10, "the swap to wait for its removed pack", [s.process])
    s.kill()
    s.start()
    assert s.status()["bay"]["finishing"] == 1
    # The removed pack's BMS starts its session after the restart: its one BRM is heard.
    s.can[2].insert(gbt27930_bms.Pack(serial=0xB2, soc_pct=15), handshake_once=True)
    s.scanner[2].send(PACK_B)
    wait_until(s.swaps, 30, "the resumed swap stored", [s.process])
    (swap,) = s.swaps()
    assert (swap.fields["code_out"], swap.fields["code_in"]) == (PACK_B, PACK_A)
    assert s.status()["bay"]["finishing"] == 0 and s.workflow()["swaps_sealed"] == 1


def test_a_removed_pack_that_identified_itself_while_the_agent_was_down_is_an_alarm_not_silence(station):
    """A real BMS's one BRM came while the agent was restarting: the slot stays unidentified. The swap is
    sealed with the removed side `unidentified` (the vehicle's new battery is in the record) and the
    operator is alarmed, with the evidence kept in the outbox."""
    s = station(slots=(1, 2), identity_wait_s=4)
    s.stock(1, PACK_A, 0xA1, 90)
    s.lines(f"VEHICLE {VIN_1}", "OUT 2", "IN 1")
    s.can[1].remove()
    s.lines("DONE")
    wait_until(lambda: s.status()["bay"]["finishing"] == 1, 10, "the swap to wait", [s.process])
    s.kill()
    s.can[2].insert(gbt27930_bms.Pack(serial=0xB2, soc_pct=15), handshake_once=True)
    wait_until(lambda: s.can[2].player.sent > 40, 10, "the removed pack's handshake, unheard", [])
    s.start()
    wait_until(s.swaps, 30, "the swap stored with one side unidentified", [s.process])
    (swap,) = s.swaps()
    assert swap.fields["unidentified"] == "out" and "code_out" not in swap.fields
    assert (swap.fields["vin"], swap.fields["code_in"], swap.fields["slot_out"]) == (VIN_1, PACK_A, 2)
    assert s.server.store.trace(PACK_A)["vin"] == VIN_1
    alarmed(s, "removed battery (slot 2) unidentified", VIN_1)
    assert s.workflow()["swaps_partial"] == 1
    (evidence,) = s.evidence()
    assert VIN_1 in evidence and "unidentified" in evidence


def test_a_silent_can_adapter_and_an_unreadable_code_never_seal_a_guess(station):
    """Slot 2's adapter is connected but its pack never speaks, and nobody scans it; slot 1's stock was never
    identified. Neither battery is known: nothing is sealed, and it is an alarm with evidence."""
    s = station(slots=(1, 2), identity_wait_s=3)
    s.can[1].insert(gbt27930_bms.Pack(serial=0xA1, soc_pct=90), handshake_once=False)
    wait_until(lambda: s.slot(1).get("secondary"), 20, "slot 1's BMS", [s.process])
    s.lines(f"VEHICLE {VIN_1}", "OUT 2", "IN 1", "DONE")
    wait_until(lambda: s.workflow().get("swaps_unsealed") == 1, 20, "the swap to give up", [s.process])
    assert s.swaps() == []
    alarmed(s, "neither battery was identified")
    assert 'bt_agent_workflow_total{what="swaps_unsealed"} 1' in get(s.port, "/metrics")[1]
    assert len(s.evidence()) == 1


def test_plc_bounces_garbles_and_lost_lines_never_put_a_battery_under_the_wrong_vin(station):
    s = station(slots=(1, 2, 3))
    s.stock(1, PACK_A, 0xA1, 90, handshake_once=False)
    s.stock(3, PACK_C, 0xC3, 88, handshake_once=False)

    # Swap 1: both sensors bounce, and a checksummed line garbled on the wire is dropped, not acted on.
    s.lines(f"VEHICLE {VIN_1}", "OUT 2", "OUT 2")
    s.can[2].insert(gbt27930_bms.Pack(serial=0xB2, soc_pct=15))
    s.scanner[2].send(PACK_B)
    wait_until(lambda: s.slot(2).get("code") == PACK_B, 20, "the removed pack", [s.process])
    s.lines("IN 1", "IN 1")
    s.plc.send(garbled(with_checksum("IN 1"), 3, "3"))  # "IN 1*HH" with one digit flipped on the wire
    s.can[1].remove()
    s.lines("DONE")
    wait_until(s.swaps, 30, "the first swap", [s.process])
    (first,) = s.swaps()
    assert (first.fields["vin"], first.fields["code_out"], first.fields["code_in"]) == (VIN_1, PACK_B, PACK_A)

    # Swap 2: the VIN is misread (check digit). Its batteries still move, and nothing is sealed for them.
    s.lines(f"VEHICLE {MISREAD}", "OUT 1")
    s.can[1].insert(gbt27930_bms.Pack(serial=0xD1, soc_pct=20))
    s.scanner[1].send(PACK_D)
    s.lines("IN 3")
    s.can[3].remove()
    s.lines("DONE")
    # Swap 3: its DONE is lost, and the next vehicle's VEHICLE line comes: swap 3 is abandoned, not given
    # to vehicle 4; vehicle 4 names a slot the station does not have.
    s.lines(f"VEHICLE {VIN_3}", "IN 2")
    s.can[2].remove()
    s.plc_checked.send(f"VEHICLE {VIN_4}")
    s.lines("OUT 99", "IN 0", "DONE")
    wait_until(lambda: len(s.evidence()) == 3, 20, "the three unsealed swaps' evidence", [s.process])
    wait_until(lambda: s.status()["bay"]["finishing"] == 0, 10, "nothing left finishing", [s.process])
    assert len(s.swaps()) == 1, [e.fields for e in s.swaps()]
    w = s.workflow()
    assert w["repeated_lines"] == 2 and w["vehicles_unreadable"] == 1 and w["swaps_abandoned"] == 1
    assert w["bad_slot"] >= 1 and w["swaps_unsealed"] == 3 and w["swaps_sealed"] == 1
    plc = next(src for src in s.status()["sources"] if src["name"].startswith("serial:plc:"))
    assert plc["counters"].get("bad_frame:bad_checksum") == 1
    reasons = " | ".join(s.evidence())  # the misread swap concludes once its removed pack is read
    assert "an unknown VIN (OUT 1, IN 3) not sealed: its VEHICLE line was unreadable" in reasons
    assert "check digit" in reasons and f"swap of {VIN_3} (OUT None, IN 2) not sealed: abandoned" in reasons
    assert f"swap of {VIN_4} (OUT None, IN None) not sealed: OUT 99: the station has no slot 99" in reasons
    alarmed(s, "3 swap(s)")


# -- config and operations ---------------------------------------------------------------------------


def _run(config: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "battery_trace.agent.cli", *command, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _config(tmp_path: Path, body: str) -> Path:
    key = tmp_path / "dev.key"
    if not key.exists():
        keys.save_private(keys.generate(), key)
    unreachable = type("B", (), {"host": "127.0.0.1", "port": free_port()})()
    config, _ = agents.write_config(
        tmp_path / "agent.toml", "station-1", key, keys.generate().public.hex, unreachable, "swap_station", body
    )
    return config


def _slot(n: int, channel: str) -> str:
    return f'[[slots]]\nslot = {n}\n[slots.can]\ninterface = "slcan"\nchannel = "{channel}"\n'


CONFLICTS = {
    "a scanner for a slot that does not exist": (
        _slot(1, "/dev/can1") + '[[scanners]]\nslot = 7\nport = "/dev/scan7"\n',
        "no [[slots]] has this number (slots: 1)",
    ),
    "two scanners on one port": (
        _slot(1, "/dev/can1")
        + _slot(2, "/dev/can2")
        + '[[scanners]]\nslot = 1\nport = "/dev/scan"\n[[scanners]]\nslot = 2\nport = "/dev/scan"\n',
        "port '/dev/scan' is also used by [[scanners]] slot = 1",
    ),
    "two slots on one slcan adapter": (
        _slot(1, "/dev/can-a") + _slot(2, "/dev/can-a"),
        "is also used by [slots] slot = 1",
    ),
    "a scanner on the PLC's port": (
        _slot(1, "/dev/can1") + '[[scanners]]\nslot = 1\nport = "/dev/ttyS1"\n[plc]\nport = "/dev/ttyS1"\n',
        "is also used by [[scanners]] slot = 1",
    ),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_a_config_that_shares_a_port_or_names_no_slot_is_refused_in_one_line(tmp_path, case):
    body, words = CONFLICTS[case]
    result = _run(_config(tmp_path, body), "run")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert words in lines[0] and "agent.toml" in lines[0], lines[0]


def test_status_on_an_empty_outbox_file_says_so(tmp_path):
    config = _config(tmp_path, "")
    (tmp_path / "station-1-outbox.sqlite").write_bytes(b"")
    result = _run(config, "status", "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert report["outbox"]["depth"] == 0 and "empty" in report["outbox"]["note"]


def test_an_outbox_carries_its_schema_version_and_an_old_one_is_migrated(tmp_path):
    from battery_trace.agent.outbox import SCHEMA_VERSION, Outbox, OutboxError

    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:  # the schema before versions: no bay, no user_version
        db.executescript(
            "CREATE TABLE chain (kid BLOB PRIMARY KEY, last_seq INTEGER NOT NULL, last_hash BLOB NOT NULL);"
            "CREATE TABLE outbox (kid BLOB NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL, envelope BLOB "
            "NOT NULL, sealed_at REAL NOT NULL, PRIMARY KEY (kid, seq));"
            "INSERT INTO chain VALUES (x'01', 7, x'02');"
        )
    outbox = Outbox(old)
    assert outbox.head(b"\x01") == 7 and outbox.load_bay() is None
    outbox.save_bay("{}")
    outbox.close()
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(OutboxError, match="newer battery-agent"):
        Outbox(newer)


# -- the contract and the check digit ------------------------------------------------------------------


def test_a_swap_names_its_unidentified_side_or_carries_both_codes():
    from battery_trace.protocol import events

    whole = {"vin": VIN_1, "code_out": PACK_B, "code_in": PACK_A, "health_out": {"soc_pct": 15.0}}
    whole |= {"health_in": {"soc_pct": 90.0}, "slot_out": 2, "slot_in": 1}
    assert events.body_errors("swapped", "label", whole) == []  # what schema 1 always took
    partial = {k: v for k, v in whole.items() if k not in ("code_out", "health_out")} | {"unidentified": "out"}
    assert events.body_errors("swapped", "label", partial) == []
    both = whole | {"unidentified": "out"}
    assert [e.path for e in events.body_errors("swapped", "label", both)] == ["code_out"]
    silent = {k: v for k, v in whole.items() if k != "code_out"}
    assert [e.path for e in events.body_errors("swapped", "label", silent)] == ["code_out"]


def test_emit_refuses_a_vin_whose_check_digit_is_wrong(tmp_path):
    config = _config(tmp_path, "")
    text = config.read_text().replace('kind = "swap_station"', 'kind = "submitter"')
    config.write_text(text.replace("[device]\n", '[device]\nrole = "vehicle_maker"\n'))
    result = _run(config, "emit", "installed", "--field", f"code={PACK_A}", "--field", f"vin={MISREAD}", "--no-wait")
    assert result.returncode != 0 and "check digit (position 9) is '5'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
