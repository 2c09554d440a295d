"""The station's reality, identity side: a reading is never sealed under the wrong battery's code, and
what is sealed is what a technician can trust.

Real `battery-agent run` processes against the repository's stubs (slcan adapters over ptys carrying a
GB/T 27930 BMS, Daly and JBD BMSs on ptys, label scanners, a PLC), a real mosquitto and collector. The
clock test runs the agent in-process, because it steps the wall clock under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from battery_trace.agent import app, config
from battery_trace.agent.battery_view import BatteryView
from battery_trace.agent.identity import Bindings
from battery_trace.agent.readings import Health, Identity
from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.can_slot import CanSlot
from battery_trace.firmware_stubs.daly_bms import DalyBms, DalyPack
from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
from battery_trace.firmware_stubs.line_device import LineDevice
from battery_trace.firmware_stubs.pty_link import PtyLink

from harness import agents
from harness.waiting import wait_until

pytestmark = pytest.mark.hostile
PACK_A, PACK_B, PACK_C = (f"0RJPEA00HAU0AAG1C3000{n}" for n in (123, 124, 125))
VIN = "LNBSCB3F1PW123456"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "battery_trace.agent.cli", *args], capture_output=True, text=True, timeout=30
    )


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Rig:
    """A maintenance rig agent with a Daly BMS on a pty."""

    def __init__(self, tmp_path: Path, server, pack: DalyPack, extra_site: str = "") -> None:
        key = server.device("rig-1", "maintenance")
        self.link = PtyLink(tmp_path / "daly")
        self.bms = DalyBms(self.link, pack)
        self.bms.start()
        body = (
            f'[[slots]]\nslot = 1\n[slots.serial]\nport = "{self.link.path}"\nprotocol = "daly"\n'
            "poll_interval_s = 0.2\ntimeout_s = 0.3\n"
        )
        self.config, self.port = agents.write_config(
            tmp_path / "rig.toml",
            "rig-1",
            key,
            server.public.hex,
            server.broker,
            "maintenance_rig",
            body,
            role="maintenance",
            extra_site=extra_site,
        )
        self.process = agents.start(self.config, tmp_path / "agent.log")

    def confirm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli("confirm", *args, "-c", str(self.config))

    def close(self) -> None:
        agents.stop(self.process)
        self.bms.stop()
        self.link.close()


@pytest.mark.integration
def test_a_pack_changed_at_a_rig_is_read_anew_and_never_sealed_under_the_old_code(tmp_path, record_server):
    """Items 1 and 2: pack B plugged in a second after pack A (well within absent_after_s) is read from its
    own BMS, and the technician's confirmation names B with B's health."""
    rig = Rig(tmp_path, record_server, DalyPack(code=PACK_A, soc_pct=91.0), "absent_after_s = 30\n")
    try:
        wait_until(lambda: agents.slot(rig.port).get("code") == PACK_A, 20, "pack A's code", [rig.process])
        rig.bms.change_pack(DalyPack(code=PACK_B, soc_pct=12.5), gap_s=1.0)
        wait_until(lambda: agents.slot(rig.port).get("code") == PACK_B, 15, "pack B's code, read anew", [rig.process])
        wait_until(lambda: agents.slot(rig.port)["health"].get("soc_pct") == 12.5, 10, "pack B's health", [rig.process])
        done = rig.confirm("inspection")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: record_server.events("maintenance"), 20, "the confirmation to be stored", [rig.process])
        (service,) = record_server.events("maintenance")
        assert service.fields["code"] == PACK_B and service.fields["health"]["soc_pct"] == 12.5
        assert agents.status(rig.port)["slot_changes"]["removed"] >= 1  # A left, as far as the record goes
    finally:
        rig.close()


class Station:
    """A swap station agent: CAN slots on slcan adapters, a label scanner per slot, a PLC."""

    def __init__(self, tmp_path: Path, server, slots: int = 2, extra_site: str = "absent_after_s = 30\n") -> None:
        key = server.device("station-1", "swap_operator")
        self.slots = {n: CanSlot(tmp_path / f"can-slot{n}") for n in range(1, slots + 1)}
        self.scanners = {n: LineDevice(PtyLink(tmp_path / f"scanner-slot{n}")) for n in self.slots}
        self.plc = LineDevice(PtyLink(tmp_path / "plc"), ending=b"\n")
        body = agents.station_body(tmp_path, self.slots)
        self.config, self.port = agents.write_config(
            tmp_path / "station.toml",
            "station-1",
            key,
            server.public.hex,
            server.broker,
            "swap_station",
            body,
            role="swap_operator",
            health_interval_s=0.5,
            extra_site=extra_site + "identity_wait_s = 20\n",
        )
        self.log = tmp_path / "station.log"
        self.process = agents.start(self.config, self.log)

    def restart(self) -> None:
        agents.stop(self.process)
        self.process = agents.start(self.config, self.log)

    def heard(self, n: int) -> None:
        wait_until(lambda: agents.slot(self.port, n).get("secondary"), 20, f"slot {n}'s BMS", [self.process])

    def close(self) -> None:
        agents.stop(self.process)
        for s in self.slots.values():
            s.close()


@pytest.mark.integration
def test_a_new_pack_in_a_slot_is_never_bound_to_the_old_packs_label(tmp_path, record_server):
    """Item 1 at a station: pack A is labelled and bound; pack B's BMS speaks in the same slot a moment
    after A left, long before absent_after_s: B is a new, unidentified battery, never bound to A's code."""
    station = Station(tmp_path, record_server, slots=1)
    try:
        station.slots[1].insert(gbt27930_bms.Pack(serial=0xA1))
        station.heard(1)
        station.scanners[1].send(PACK_A)
        wait_until(lambda: agents.slot(station.port)["code"] == PACK_A, 10, "pack A identified", [station.process])
        secondary_a = agents.slot(station.port)["secondary"]
        station.slots[1].insert(gbt27930_bms.Pack(serial=0xB2))  # insert() takes A out first
        wait_until(
            lambda: agents.slot(station.port)["secondary"] not in (None, secondary_a), 20, "B's BMS", [station.process]
        )
        time.sleep(1.5)  # B keeps talking; on the old code it would have inherited A's label by now
        status = agents.status(station.port)
        assert status["slots"]["1"]["code"] is None
        assert status["bindings"] == {"bound": 1}  # A's binding only: B was never bound to A's label
        assert status["slot_changes"]["removed"] == 1 and status["readings"]["battery_changed"] == 1
        station.scanners[1].send(PACK_B)
        wait_until(lambda: agents.slot(station.port)["code"] == PACK_B, 10, "pack B identified", [station.process])
        listed = json.loads(cli("bindings", "list", "--json", "-c", str(station.config)).stdout)
        assert {row["code"] for row in listed} == {PACK_A, PACK_B}
    finally:
        station.close()


@pytest.mark.integration
def test_a_constant_bms_serial_is_not_an_identity(tmp_path, record_server):
    """Item 3: two packs whose BMS firmware sends the same serial. Pack 2's health is never sealed under
    pack 1's code; the identity is distrusted for good, an alarm, and a person can list and remove it."""
    station = Station(tmp_path, record_server, slots=2)
    try:
        station.slots[1].insert(gbt27930_bms.Pack(serial=0x01, soc_pct=80))
        station.heard(1)
        station.scanners[1].send(PACK_A)
        wait_until(lambda: record_server.events("health"), 20, "a health snapshot of pack 1", [station.process])
        station.slots[2].insert(gbt27930_bms.Pack(serial=0x01, soc_pct=20))  # same manufacturer, serial, date
        station.heard(2)
        wait_until(lambda: agents.status(station.port)["bindings"].get("distrusted"), 10, "distrust", [station.process])
        time.sleep(2)  # several health intervals
        status = agents.status(station.port)
        assert status["slots"]["2"]["code"] is None and status["slots"]["1"]["code"] == PACK_A  # the label stands
        assert {(e.fields["slot"], e.fields["code"]) for e in record_server.events("health")} == {(1, PACK_A)}
        code, why = healthz(station.port)
        assert code == 503 and "not unique" in why and status["slots"]["1"]["secondary"] in why
        listed = cli("bindings", "list", "-c", str(station.config))
        assert listed.returncode == 0 and "DISTRUSTED" in listed.stdout and "slots [1, 2]" in listed.stdout
        station.restart()  # distrust is kept on disk: after a restart slot 2 still gets no code from it
        station.heard(2)
        time.sleep(1)
        assert agents.slot(station.port, 2)["code"] is None
        secondary = agents.slot(station.port, 2)["secondary"]
        assert cli("bindings", "remove", secondary, "-c", str(station.config)).returncode == 0
        again = cli("bindings", "remove", secondary, "-c", str(station.config))
        assert again.returncode == 1 and "not bound" in again.stderr
    finally:
        station.close()


def test_a_relabelled_pack_does_not_return_to_its_old_code_after_a_restart(tmp_path):
    """Item 3: the real bindings store, closed and opened again as a restart does."""
    path = tmp_path / "outbox.sqlite"
    view = BatteryView(Bindings(path))
    brm = Identity("bms", secondary="gbt27930:CATL:1:2024-05-17")
    view.update(1, brm)
    view.update(1, Identity("label", code=PACK_A))
    view.update(1, Identity("label", code=PACK_C))  # re-labelled: the label wins, the BMS identity is doubted
    view.update(1, brm)
    assert view.slots[1].code == PACK_C
    view.bindings.close()
    restarted = BatteryView(Bindings(path))
    restarted.update(1, brm)
    assert restarted.slots[1].code is None and restarted.bindings.alarm


@pytest.mark.integration
def test_a_stuck_scanner_naming_one_pack_on_two_slots_seals_neither_its_health_nor_a_swap(tmp_path, record_server):
    """Item 4: one code on two slots at once gets no health snapshot from either, and a swap whose removed
    and installed packs carry the same code is refused, counted, and said why."""
    station = Station(tmp_path, record_server, slots=2)
    try:
        for n in (1, 2):
            station.slots[n].insert(gbt27930_bms.Pack(serial=0x10 + n))
            station.heard(n)
        for n in (1, 2):
            station.scanners[n].send(PACK_A)  # the scanner is stuck on one label
        wait_until(
            lambda: agents.status(station.port)["workflow"].get("health_refused_code_on_two_slots", 0) >= 2,
            10,
            "the shared code's health to be refused",
            [station.process],
        )
        sealed = agents.status(station.port)["sealer"]["sealed"]
        station.plc.send(f"VEHICLE {VIN}")
        station.plc.send("OUT 2")
        station.scanners[2].send(PACK_A)
        station.plc.send("IN 1")
        station.plc.send("DONE")
        wait_until(
            lambda: agents.status(station.port)["workflow"].get("swaps_refused_same_code"),
            20,
            "refusal",
            [station.process],
        )
        assert agents.status(station.port)["sealer"]["sealed"] == sealed  # no health for A, and no swap
        assert record_server.events("swapped") == []
        assert "is named both removed and installed" in station.log.read_text()
    finally:
        station.close()


def test_a_swap_names_the_weaker_identity_source_not_always_binding():
    """Item 4: a label on one side and a BMS-reported code on the other is a 'bms' swap, not a 'binding' one."""
    from battery_trace.agent.decoders.station import StationCommand
    from battery_trace.agent.workflows.swap_station import SwapStation

    view, sealed = BatteryView(), []
    station = SwapStation(view, lambda d: sealed.append(d) or len(sealed), health_interval_s=3600)
    view.update(1, Identity("label", code=PACK_A))
    view.update(1, Health(soc_pct=90.0))
    station.command(StationCommand("VEHICLE", vin=VIN))
    station.command(StationCommand("OUT", slot=2))
    view.update(2, Identity("bms", code=PACK_B))
    view.update(2, Health(soc_pct=10.0))
    station.command(StationCommand("IN", slot=1))
    station.command(StationCommand("DONE"))
    (swap,) = sealed
    assert swap.source == "bms"


@pytest.mark.integration
def test_rig_confirmations_refuse_stale_health_repeats_and_a_pack_replacing_itself(tmp_path, record_server):
    """Items 4 and 11: the same confirmation twice, REPLACE naming the connected pack, the same REPLACE
    twice, and health from a BMS that stopped answering are refused (exit 1, the reason on stderr)."""
    rig = Rig(tmp_path, record_server, DalyPack(code=PACK_A), "absent_after_s = 60\n")
    try:
        wait_until(lambda: agents.slot(rig.port).get("code") == PACK_A, 20, "pack A's code", [rig.process])
        assert rig.confirm("rebalance", "--note", "cell 3").returncode == 0
        twice = rig.confirm("rebalance", "--note", "cell 3")
        assert twice.returncode == 1 and "already sealed as seq" in twice.stderr
        itself = rig.confirm("--replace-with", PACK_A, "--vin", VIN)
        assert itself.returncode == 1 and "cannot replace itself" in itself.stderr
        assert rig.confirm("--replace-with", PACK_B, "--vin", VIN).returncode == 0
        again = rig.confirm("--replace-with", PACK_B, "--vin", VIN, "--note", "again")
        assert again.returncode == 1 and "already sealed" in again.stderr
        rig.bms.faults.silent = 1.0  # the BMS stops answering; the slot stays occupied for absent_after_s
        wait_until(
            lambda: time.time() - (agents.slot(rig.port).get("health_at") or time.time()) > 11,
            20,
            "stale",
            [rig.process],
        )
        stale = rig.confirm("inspection")
        assert stale.returncode == 1 and "stopped answering" in stale.stderr
        counters = agents.status(rig.port)["workflow"]
        assert counters["refused_duplicate"] == 2 and counters["refused_same_pack"] == 1
        assert counters["refused_stale_health"] == 1
        wait_until(lambda: record_server.events("replaced"), 20, "the replacement", [rig.process])
        assert len(record_server.events("maintenance")) == 1 and len(record_server.events("replaced")) == 1
    finally:
        rig.close()


@pytest.mark.integration
def test_readings_a_technician_can_trust(tmp_path, record_server):
    """Item 11: a Daly with 3 probes pads its temperature frame with -40 °C (not readings); a 0 mV cell
    stays in the cells and sets the minimum (it is the dead cell the technician replaces); impossible
    values (SOC 250 %, a 9 V cell) are sealed as read with a named fault, counted."""
    cells = [3301, 3302, 0, 3305, 9000]
    rig = Rig(tmp_path, record_server, DalyPack(code=PACK_A, soc_pct=250.0, cells_mv=cells, temps_c=[24, 25, 26]))
    try:
        wait_until(
            lambda: len(agents.slot(rig.port).get("health", {}).get("cells_v", [])) == 5, 20, "cells", [rig.process]
        )
        assert rig.confirm("cell_replacement", "--note", "cell 3 dead").returncode == 0
        wait_until(lambda: record_server.events("maintenance"), 20, "the confirmation", [rig.process])
        (event,) = record_server.events("maintenance")
        health = event.fields["health"]
        assert health["temps_c"] == [24, 25, 26]
        assert health["cells_v"] == [3.301, 3.302, 0.0, 3.305, 9.0] and health["cell_min_v"] == 0.0
        assert health["soc_pct"] == 250.0
        faults = set(health["faults"])
        assert {"implausible_soc_pct", "implausible_cells_v", "implausible_cell_min_v"} <= faults
        counted = agents.status(rig.port)["readings"]
        assert counted["implausible_soc_pct"] == 1 and counted["implausible_cells_v"] == 1
    finally:
        rig.close()


@pytest.mark.integration
def test_an_open_ntc_on_a_jbd_is_kept_and_flagged(tmp_path, record_server):
    """Item 11: an open NTC reads -273.1 °C; it is sealed as read, with its fault."""
    key = record_server.device("gw-ntc", "gateway")
    link = PtyLink(tmp_path / "bms")
    bms = JbdBms(link, PackState(temps_c=[24.5, -273.1]))
    bms.start()
    body = agents.jbd_slot(link.path, PACK_A, 0.1)
    cfg, port = agents.write_config(
        tmp_path / "gw.toml",
        "gw-ntc",
        key,
        record_server.public.hex,
        record_server.broker,
        "gateway",
        body,
        role="gateway",
        health_interval_s=0.3,
    )
    agent = agents.start(cfg, tmp_path / "gw.log")
    try:
        wait_until(lambda: record_server.events("health"), 20, "a snapshot", [agent])
        health = record_server.events("health")[0].fields["health"]
        assert health["temps_c"] == [24.5, -273.1] and "implausible_temps_c" in health["faults"]
        assert agents.slot(port)["health"]["faults"] == ["implausible_temps_c"]
    finally:
        agents.stop(agent)
        bms.stop()
        link.close()


@pytest.mark.integration
def test_a_wall_clock_stepped_back_or_forward_changes_no_duration(tmp_path, broker, monkeypatch):
    """Item 9: an in-process agent (a JBD gateway, its code from a scanned label) whose wall clock NTP steps
    back an hour keeps sealing snapshots; stepped forward an hour, no slot is taken for removed and the
    label's code is not forgotten."""
    from battery_trace.protocol import keys

    key_path = tmp_path / "gw.key"
    keys.save_private(keys.generate(), key_path)
    link = PtyLink(tmp_path / "bms")
    bms = JbdBms(link, PackState())
    bms.start()
    scanner = LineDevice(PtyLink(tmp_path / "scanner"))
    body = (
        f'[[slots]]\nslot = 1\n[slots.serial]\nport = "{link.path}"\npoll_interval_s = 0.1\n'
        f'[[scanners]]\nslot = 1\nport = "{tmp_path / "scanner"}"\n'
    )
    path, _ = agents.write_config(
        tmp_path / "gw.toml",
        "gw-clock",
        key_path,
        keys.generate().public.hex,
        broker,
        "gateway",
        body,
        role="gateway",
        health_interval_s=0.2,
        extra_site="absent_after_s = 5\n",
    )
    agent = app.Agent(config.load(path))
    real_time, offset = time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + offset[0])
    loop = asyncio.new_event_loop()
    task = loop.create_task(agent.run())

    def run() -> None:  # until the test cancels it, as SIGTERM does in `battery-agent run`
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)
        loop.close()

    runner = threading.Thread(target=run, daemon=True)
    runner.start()

    def sealed_more(than: int) -> bool:
        return agent.sealer.sealed > than

    try:
        wait_until(lambda: agent.view.slots.get(1) and agent.view.slots[1].seen_at, 20, "the BMS")
        scanner.send(PACK_A)
        wait_until(lambda: agent.view.slots[1].code == PACK_A, 10, "the label")
        wait_until(lambda: sealed_more(0), 10, "a first snapshot")
        offset[0] = -3600.0  # NTP steps the clock back an hour
        before = agent.sealer.sealed
        wait_until(lambda: sealed_more(before + 3), 10, "snapshots after the step back")
        offset[0] = +3600.0  # and then forward an hour
        before = agent.sealer.sealed
        wait_until(lambda: sealed_more(before + 3), 10, "snapshots after the step forward")
        assert agent.slot_changes["removed"] == 0
        assert agent.view.slots[1].code == PACK_A
    finally:
        loop.call_soon_threadsafe(task.cancel)
        runner.join(timeout=20)
        bms.stop()
        link.close()
