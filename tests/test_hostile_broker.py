"""Hostile broker sessions: devices holding a valid certificate that try to take the fleet's events,
QoS 0 floods during a store outage, and retained statuses meant to blind the operators.

Each runs on the real parts: mosquitto with configs/mosquitto-tls.conf and the files of
``battery-server pki``, real collector processes, a private PostgreSQL that is stopped, the real
dashboard's JSON API.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness import waiting
from harness.broker import Broker, BrokerUnavailable
from tests.conftest import missing_service
from tests.test_transport_security import Client, files, pki, tls_listener

pytestmark = [pytest.mark.hostile, pytest.mark.integration]

HONEST = [f"station-{i}" for i in range(1, 4)]
HOSTILE = [f"intruder-{i}" for i in range(1, 4)]
# Every filter a device could use to reach events, statuses or receipts that are not its own.
GREEDY_FILTERS = [
    "$share/collectors/bt/v1/+/events",
    "$share/collectors/bt/v1/station-1/events",
    "$share/collectors/#",
    "$share/intruders/bt/v1/+/events",
    "bt/v1/+/events",
    "bt/v1/station-1/events",
    "bt/v1/+/receipts",
    "bt/v1/+/status",
    "bt/v1/#",
    "#",
]


@pytest.fixture
def fleet_site(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    assert pki(folder, "init", "--site", "Hostile swap network") == 0
    assert pki(folder, "broker", "--host", "127.0.0.1") == 0
    assert pki(folder, "collector", "collector-1") == 0
    for device in HONEST + HOSTILE:
        assert pki(folder, "device", device) == 0
    return folder


@pytest.fixture
def fleet_broker(tmp_path: Path, fleet_site: Path):
    try:
        b = Broker(tmp_path / "broker", listener=tls_listener(fleet_site)).start()
    except BrokerUnavailable as exc:
        missing_service("mosquitto", exc)
    yield b
    b.stop()


def test_no_device_can_join_the_collectors_group_or_read_what_is_not_its_own(fleet_site, fleet_broker):
    """Several sessions with valid device certificates subscribe to everything they can think of while
    the fleet publishes: every honest event reaches the collectors' group at once, the intruders get
    nothing, and the broker says no to each greedy subscription (SUBACK 0x87, not authorised)."""
    per_device = 40
    collector = Client(fleet_broker, files(fleet_site, "collector-1"), "collector-1")
    intruders = [Client(fleet_broker, files(fleet_site, name), f"bt-agent-{name}") for name in HOSTILE]
    honest = [Client(fleet_broker, files(fleet_site, name), f"bt-agent-{name}") for name in HONEST]
    try:
        assert not collector.subscribe("$share/collectors/bt/v1/+/events").is_failure
        answers = {
            (name, f): i.subscribe(f) for i, name in zip(intruders, HOSTILE, strict=True) for f in GREEDY_FILTERS
        }
        for device, name in zip(honest, HONEST, strict=True):
            assert not device.subscribe(f"bt/v1/{name}/receipts").is_failure  # its own receipts: yes
        sent = set()
        for n in range(per_device):
            for device, name in zip(honest, HONEST, strict=True):
                payload = f"{name}:{n}".encode()
                assert not device.publish(f"bt/v1/{name}/events", payload).is_failure
                sent.add(payload)
        waiting.wait_until(
            lambda: len(collector.messages) >= len(sent),
            10,
            f"all {len(sent)} honest events at the collectors' group (it has {len(collector.messages)})",
        )
        assert {payload for _, payload in collector.messages} == sent
        assert not collector.publish("bt/v1/station-1/receipts", b"receipt").is_failure
        waiting.wait_until(lambda: honest[0].messages, 10, "station-1's receipt")
        time.sleep(0.5)  # anything misdelivered would have arrived by now
        assert [i.messages for i in intruders] == [[] for _ in intruders]
        granted = [key for key, reason in answers.items() if reason.value != 0x87]
        assert granted == [], f"subscriptions a device must not hold: {granted}"
    finally:
        for c in [collector, *intruders, *honest]:
            c.close()


def test_a_device_issued_later_is_let_in_once_the_broker_restarts(fleet_site, fleet_broker):
    """The broker reads who may use which topic at start: a device issued afterwards publishes once the
    broker has restarted (what the operator guide says to do), and is no intruder meanwhile."""
    collector = Client(fleet_broker, files(fleet_site, "collector-1"), "collector-1")
    assert pki(fleet_site, "device", "station-9") == 0
    late = Client(fleet_broker, files(fleet_site, "station-9"), "bt-agent-station-9")
    try:
        assert late.publish("bt/v1/station-9/events", b"too early").is_failure
        assert late.subscribe("$share/collectors/bt/v1/+/events").is_failure
    finally:
        late.close()
        collector.close()
    fleet_broker.stop()
    fleet_broker.start()
    collector = Client(fleet_broker, files(fleet_site, "collector-1"), "collector-1")
    late = Client(fleet_broker, files(fleet_site, "station-9"), "bt-agent-station-9")
    try:
        assert not collector.subscribe("$share/collectors/bt/v1/+/events").is_failure
        assert not late.publish("bt/v1/station-9/events", b"on time").is_failure
        waiting.wait_until(lambda: collector.messages, 10, "station-9's event")
        assert late.subscribe("$share/collectors/bt/v1/+/events").is_failure
    finally:
        late.close()
        collector.close()
