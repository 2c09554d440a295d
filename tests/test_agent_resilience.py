"""The agent under trouble: the broker dies mid-stream, the agent itself is killed with SIGKILL, a serial
port and a USB-CAN adapter are unplugged, a forged receipt arrives. Nothing sealed is lost, nothing is
stored twice, no sequence number is reused, and the agent never stops by itself."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.firmware_stubs.slcan_adapter import Player, SlcanAdapter, gbt27930_frames
from battery_trace.protocol import keys, receipts
from battery_trace.server.audit import audit_chain

from harness import agents
from harness.pipeline import chain_head, quiet_config
from harness.publisher import Publisher
from harness.waiting import wait_until

pytestmark = pytest.mark.integration
CODE = "0RJPEA00HAU0AAG1C3000123"


def source(port: int) -> dict:
    """The first source in the agent's status ({} while the agent does not answer)."""
    return ((agents.status(port) or {}).get("sources") or [{}])[0]


def stored(server) -> list[int]:
    return sorted(e.seq for e in server.events())


def assert_complete_and_intact(server, key_path: Path, sealed: int) -> None:
    seqs = stored(server)
    assert seqs == list(range(1, sealed + 1)), f"stored {len(seqs)} of {sealed}; missing or doubled"
    key = server.store.device_keys("gw-1")[0]
    assert key.public == keys.load_private(key_path).public
    assert audit_chain(key, server.store.chain(key.kid)).first_break is None
    assert server.store.findings() == []


def drain(server, gateway) -> int:
    """Stop the agent, then deliver what it sealed with the same key and outbox but no sensors (a
    submitter), so nothing new is sealed while we wait; returns how many events were sealed in all."""
    agents.stop(gateway["process"])  # may land during start-up, before the handler: the outbox is safe anyway
    sealed = chain_head(gateway["outbox"])
    gateway["process"] = agents.start(quiet_config(gateway["config"]), gateway["log"])
    wait_until(
        lambda: stored(server) == list(range(1, sealed + 1)), 40, "every sealed event, once", [gateway["process"]]
    )
    return sealed


def test_broker_killed_and_restarted_mid_stream(record_server, gateway):
    agent = gateway["process"]
    wait_until(lambda: len(stored(record_server)) >= 10, 30, "the first events", [agent])
    record_server.broker.kill()
    before = chain_head(gateway["outbox"])
    time.sleep(2.0)
    assert chain_head(gateway["outbox"]) > before, "the agent must keep sealing while the broker is away"
    record_server.broker.start()
    assert_complete_and_intact(record_server, gateway["key"], drain(record_server, gateway))


def test_agent_killed_with_sigkill_and_restarted(record_server, gateway):
    for _ in range(3):  # killed three times while sealing, at different moments
        mark = chain_head(gateway["outbox"])
        wait_until(lambda m=mark: chain_head(gateway["outbox"]) >= m + 5, 30, "more sealing", [gateway["process"]])
        gateway["process"].send_signal(signal.SIGKILL)
        gateway["process"].wait()
        gateway["process"] = agents.start(gateway["config"], gateway["log"])
    assert_complete_and_intact(record_server, gateway["key"], drain(record_server, gateway))


def test_an_unplugged_serial_port_is_reopened(record_server, gateway):
    port, link = gateway["port"], gateway["link"]
    wait_until(lambda: source(port), 20, "the agent's status", [gateway["process"]])
    link.unplug()
    wait_until(lambda: source(port).get("connected") is False, 10, "the loss to be noticed")
    before = len(stored(record_server))
    link.plug()
    wait_until(
        lambda: agents.status(port)["sources"][0]["connected"], 20, "the port to be reopened", [gateway["process"]]
    )
    wait_until(lambda: len(stored(record_server)) > before + 3, 20, "health to flow again", [gateway["process"]])
    counters = source(port)["counters"]
    assert counters["disconnects"] >= 1 and counters["connects"] >= 2


def test_a_forged_receipt_prunes_nothing(record_server, gateway):
    port = gateway["port"]
    wait_until(lambda: len(stored(record_server)) >= 3, 20, "the first events", [gateway["process"]])
    record_server.stop()  # no real receipts from now on
    wait_until(lambda: agents.status(port)["outbox"]["depth"] >= 5, 20, "a backlog", [gateway["process"]])
    forger = keys.generate()
    kid = keys.load_private(gateway["key"]).public.kid
    publisher = Publisher(record_server.broker, "forger")
    forged = receipts.sign(receipts.Receipt("gw-1", kid, 10**6, bytes(32), int(time.time() * 1000)), forger)
    publisher.publish([("bt/v1/gw-1/receipts", forged)])
    publisher.close()
    wait_until(lambda: agents.status(port)["uplink"].get("receipts_refused", 0) >= 1, 10, "the forged receipt")
    assert agents.status(port)["outbox"]["depth"] >= 5


def test_an_unplugged_usb_can_adapter_is_reopened(tmp_path, record_server):
    key = record_server.device("gw-can", "gateway")
    link = PtyLink(tmp_path / "can0")
    adapter = SlcanAdapter(link)
    adapter.start()
    player = Player(adapter, 0.002)
    player.start_loop(lambda: gbt27930_frames(gbt27930_bms.Pack(), rounds=2), pause_s=0.1)
    body = (
        f'[[slots]]\nslot = 1\ncode = "{CODE}"\n[slots.can]\ninterface = "slcan"\nchannel = "{link.path}"\n'
        "[slots.can.options]\nsleep_after_open = 0\n"
    )
    config, port = agents.write_config(
        tmp_path / "gw.toml",
        "gw-can",
        key,
        record_server.public.hex,
        record_server.broker,
        "gateway",
        body,
        health_interval_s=0.3,
    )
    agent = agents.start(config, tmp_path / "agent.log")
    try:
        wait_until(
            lambda: (agents.status(port) or {}).get("sources", [{}])[0].get("counters", {}).get("frames"),
            20,
            "CAN frames",
            [agent],
        )
        link.unplug()
        wait_until(lambda: source(port).get("connected") is False, 10, "the loss to be noticed", [agent])
        link.plug()
        wait_until(lambda: agents.status(port)["sources"][0]["connected"], 20, "the adapter to be reopened", [agent])
        frames = agents.status(port)["sources"][0]["counters"]["frames"]
        wait_until(
            lambda: agents.status(port)["sources"][0]["counters"]["frames"] > frames, 20, "frames again", [agent]
        )
        wait_until(lambda: record_server.events("health"), 20, "health events", [agent])
    finally:
        agents.stop(agent)
        player.stop()
        adapter.stop()
        link.close()
    assert agent.returncode == 0


def test_retained_status_and_last_will(tmp_path, record_server):
    """Operators see the agent online with its backlog, and offline (the broker's last will) once it dies."""
    import json

    key = record_server.device("gw-lwt", "gateway")
    link = PtyLink(tmp_path / "bms")
    bms = JbdBms(link, PackState())
    bms.start()
    body = agents.jbd_slot(link.path, CODE)
    config, _ = agents.write_config(
        tmp_path / "gw.toml",
        "gw-lwt",
        key,
        record_server.public.hex,
        record_server.broker,
        "gateway",
        body,
        health_interval_s=0.3,
    )
    config.write_text(config.read_text().replace("[mqtt]\n", "[mqtt]\nkeepalive_s = 5\n"))
    agent = agents.start(config, tmp_path / "agent.log")
    watcher = Publisher(record_server.broker, "operator", subscribe="bt/v1/gw-lwt/status")
    try:

        def last() -> dict:
            return json.loads(watcher.received[-1].payload) if watcher.received else {}

        wait_until(lambda: last().get("state") == "online" and "backlog" in last(), 20, "an online status", [agent])
        assert {"oldest_unreceipted_s", "time", "alarm", "sources_down"} <= set(last())
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        wait_until(lambda: last() == {"state": "offline"}, 20, "the last will")
        late = Publisher(record_server.broker, "late-operator", subscribe="bt/v1/gw-lwt/status")
        wait_until(lambda: late.received, 10, "the retained status")
        assert json.loads(late.received[-1].payload) == {"state": "offline"}  # retained for whoever comes later
        late.close()
    finally:
        watcher.close()
        agents.stop(agent)
        bms.stop()
        link.close()
