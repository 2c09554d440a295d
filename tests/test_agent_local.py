"""The agent's local side: /metrics, /healthz and /status on a loopback port, and a CAN source on
python-can's virtual bus decoding a vendor pack through its DBC."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import can
import pytest
from battery_trace.agent.decoders import dbc
from battery_trace.agent.readings import Health, Identity
from battery_trace.agent.sources.can_bus import CanSettings, CanSource
from battery_trace.firmware_stubs import dbc_pack
from battery_trace.firmware_stubs.jbd_bms import JbdBms
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import keys

from harness import agents
from harness.broker import free_port
from harness.waiting import wait_until
from tests.test_dbc import DBC, MAPPING

CODE = "0RJPEA00HAU0AAG1C3000123"


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_healthz_and_status_of_a_running_agent(tmp_path):
    key = tmp_path / "device.key"
    keys.save_private(keys.generate(), key)
    link = PtyLink(tmp_path / "bms")
    bms = JbdBms(link)
    bms.start()
    unreachable = type("B", (), {"host": "127.0.0.1", "port": free_port()})()  # no broker listens there
    body = agents.jbd_slot(link.path, CODE)
    config, port = agents.write_config(
        tmp_path / "a.toml",
        "gw-1",
        key,
        keys.generate().public.hex,
        unreachable,
        "gateway",
        body,
        health_interval_s=0.3,
    )
    agent = agents.start(config, tmp_path / "agent.log")
    try:
        wait_until(lambda: agents.status(port) and agents.status(port)["sealer"]["sealed"] >= 2, 20, "sealing", [agent])
        status, text = get(port, "/metrics")
        assert status == 200
        assert 'bt_agent_source_connected{slot="1",source="serial:jbd:' in text
        assert "bt_agent_broker_connected 0" in text and "bt_agent_sealed_total" in text
        outbox_line = next(line for line in text.splitlines() if line.startswith("bt_agent_outbox_events "))
        assert int(outbox_line.split()[1]) >= 2  # nothing receipted without a broker
        status, why = get(port, "/healthz")
        assert status == 503 and "broker not connected" in why
        report = json.loads(get(port, "/status")[1])
        assert report["slots"]["1"]["code"] == CODE and report["slots"]["1"]["health"]["voltage_v"] == 52.8
        assert get(port, "/nothing")[0] == 404
        with socket.create_connection(("127.0.0.1", port)) as s:  # garbage instead of HTTP
            s.sendall(b"\x00\x01garbage\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        assert get(port, "/confirm")[0] == 404  # a gateway takes no confirmations
    finally:
        agents.stop(agent)
        bms.stop()
        link.close()


def test_a_vendor_pack_on_a_virtual_can_bus(tmp_path):
    channel = f"bt-{uuid.uuid4().hex[:8]}"
    settings = CanSettings("virtual", channel, None, "dbc", Path(DBC), MAPPING)
    readings = []
    source = CanSource(4, settings, lambda slot, r: readings.append((slot, r)))
    pack = dbc_pack.VendorPack(code="0RJPEA00HAU0AAG1C3000555")

    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        while not source.connected:
            await asyncio.sleep(0.01)
        with can.Bus(interface="virtual", channel=channel) as bus:
            for ident, data in [*dbc_pack.broadcast(pack), (dbc_pack.STATUS_ID, b"\x01")]:  # and one broken frame
                bus.send(can.Message(arbitration_id=ident, data=data, is_extended_id=True))
        for _ in range(100):
            if any(isinstance(r, Identity) for _, r in readings):
                break
            await asyncio.sleep(0.02)
        task.cancel()

    asyncio.run(scenario())
    assert {slot for slot, _ in readings} == {4}
    assert [r.code for _, r in readings if isinstance(r, Identity)] == [pack.code]
    assert next(r for _, r in readings if isinstance(r, Health)).voltage_v == 398.2
    assert source.decoder.errors["bad_frame"] == 1 and source.counters["frames"] == 7


def test_a_dbc_mapping_is_checked_when_the_source_is_built():
    bad = CanSettings("virtual", "x", None, "dbc", Path(DBC), dbc.DbcMapping(health={"soc_pct": "Nope.Nothing"}))
    with pytest.raises(dbc.DbcError, match="no signal"):
        CanSource(1, bad, lambda *a: None)
