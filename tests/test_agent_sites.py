"""Agent sites end to end: a real `battery-agent run` process, stubs on ptys (slcan USB-CAN adapters,
label scanners, a PLC, a Daly BMS), a real mosquitto and a real collector storing in SQLite."""

from __future__ import annotations

import subprocess
import sys

import pytest
from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.can_slot import CanSlot
from battery_trace.firmware_stubs.daly_bms import DalyBms, DalyPack
from battery_trace.firmware_stubs.line_device import LineDevice
from battery_trace.firmware_stubs.pty_link import PtyLink

from harness import agents
from harness.waiting import wait_until

pytestmark = pytest.mark.integration
PACK_A, PACK_B = "0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124"
VIN = "LNBSCB3F1PW123456"


def test_a_swap_at_a_station_becomes_one_swapped_event(tmp_path, record_server):
    key = record_server.device("station-1", "swap_operator")
    slots = {n: CanSlot(tmp_path / f"can-slot{n}") for n in (1, 2)}
    scanners = {n: LineDevice(PtyLink(tmp_path / f"scanner-slot{n}")) for n in (1, 2)}
    plc = LineDevice(PtyLink(tmp_path / "plc"), ending=b"\n")
    body = agents.station_body(tmp_path, (1, 2))
    config, port = agents.write_config(
        tmp_path / "agent.toml",
        "station-1",
        key,
        record_server.public.hex,
        record_server.broker,
        "swap_station",
        body,
        role="swap_operator",
        extra_site="absent_after_s = 2\nidentity_wait_s = 30\n",
    )
    agent = agents.start(config, tmp_path / "agent.log")
    try:
        # Battery A charges in slot 1; its label is scanned there once, binding its BMS identity to its code.
        slots[1].insert(gbt27930_bms.Pack(serial=0xA1, soc_pct=80))
        wait_until(
            lambda: agents.slot(port).get("seen_at"),
            20,
            "slot 1's BMS to be heard",
            [agent],
        )
        scanners[1].send(PACK_A.lower(), split=True)
        wait_until(lambda: agents.status(port)["slots"]["1"]["code"] == PACK_A, 10, "slot 1 identified", [agent])
        wait_until(lambda: record_server.events("health"), 20, "a health snapshot of the stock", [agent])

        # A vehicle comes in with battery B; B goes to slot 2 and A into the vehicle.
        plc.send(f"VEHICLE {VIN}")
        plc.send("OUT 2")
        slots[2].insert(gbt27930_bms.Pack(serial=0xB2, soc_pct=12))
        scanners[2].send(PACK_B)
        plc.send("IN 1")
        slots[1].remove()
        plc.send("DONE")
        wait_until(lambda: record_server.events("swapped"), 30, "the swap to be stored", [agent])
        (swap,) = record_server.events("swapped")
        f = swap.fields
        assert (f["vin"], f["code_out"], f["code_in"], f["slot_out"], f["slot_in"]) == (VIN, PACK_B, PACK_A, 2, 1)
        assert f["health_in"]["soc_pct"] >= 80 and f["health_out"]["soc_pct"] < 30
        assert len(f["health_out"]["cells_v"]) == 96
        assert swap.source == "label"
        status = agents.status(port)
        assert status["workflow"]["swaps_sealed"] == 1 and status["bindings"]["bound"] == 2
        assert status["slot_changes"]["inserted"] >= 2
        wait_until(lambda: agents.status(port)["slot_changes"].get("removed"), 10, "slot 1 to be seen empty", [agent])
        trace = record_server.store.trace(PACK_A)
        assert trace["state"] == "in_vehicle" and trace["vin"] == VIN
    finally:
        agents.stop(agent)
        for s in slots.values():
            s.close()
    assert agent.returncode == 0


def test_a_technician_confirms_service_at_a_rig(tmp_path, record_server):
    key = record_server.device("rig-1", "maintenance")
    link = PtyLink(tmp_path / "daly")
    bms = DalyBms(link, DalyPack(code=PACK_A, soc_pct=47.5, cells_mv=[3301, 3302, 3290, 3305]))
    bms.start()
    keypad = LineDevice(PtyLink(tmp_path / "keypad"))
    body = (
        f'[[slots]]\nslot = 1\n[slots.serial]\nport = "{link.path}"\nprotocol = "daly"\npoll_interval_s = 0.3\n'
        f'[keypad]\nport = "{tmp_path / "keypad"}"\n'
    )
    config, port = agents.write_config(
        tmp_path / "rig.toml",
        "rig-1",
        key,
        record_server.public.hex,
        record_server.broker,
        "maintenance_rig",
        body,
        role="maintenance",
    )
    agent = agents.start(config, tmp_path / "agent.log")

    def confirm(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "battery_trace.agent.cli", "confirm", *args, "-c", str(config)]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    try:
        wait_until(
            lambda: agents.slot(port).get("code") == PACK_A,
            20,
            "the Daly BMS to report its code",
            [agent],
        )
        done = confirm("rebalance", "--note", "cell 3 low")
        assert done.returncode == 0, done.stderr
        replaced = confirm("--replace-with", PACK_B, "--vin", VIN, "--note", "capacity below 70 %")
        assert replaced.returncode == 0, replaced.stderr
        wait_until(lambda: record_server.events("replaced"), 20, "the replacement to be stored", [agent])
        service = record_server.events("maintenance")[0]
        assert service.fields["code"] == PACK_A and service.fields["action"] == "rebalance"
        assert service.fields["findings"] == "cell 3 low" and service.fields["health"]["soc_pct"] == 47.5
        assert service.source == "bms"
        (replacement,) = record_server.events("replaced")
        assert replacement.fields == {
            "vin": VIN,
            "code_out": PACK_A,
            "code_in": PACK_B,
            "reason": "capacity below 70 %",
        }
        keypad.send("CONFIRM inspection no defects found")
        wait_until(lambda: len(record_server.events("maintenance")) == 2, 20, "the keypad's confirmation", [agent])
        assert record_server.events("maintenance")[1].fields["findings"] == "no defects found"
        bad = confirm("--replace-with", "NOT-A-CODE", "--vin", VIN)
        assert bad.returncode == 1 and "valid: 24 characters" in bad.stderr  # refused, with the rule broken
    finally:
        agents.stop(agent)
        bms.stop()
        link.close()
