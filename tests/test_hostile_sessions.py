"""Hostile sessions on the broker as deployed: a device certificate that connects under another
client's id, a revoked device that stays connected, and the documented deployment itself (an
unprivileged broker that must not read the CA key, and messages too large to keep).

Each runs on mosquitto with configs/mosquitto-tls.conf and the files of ``battery-server pki``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from battery_trace.agent.uplink import client_id as agent_client_id
from battery_trace.server.pki import ADMIN, Pki
from battery_trace.server.web.status_listener import client_id as status_client_id
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from battery_trace.tls import client_context
from harness import waiting
from harness.broker import Broker, BrokerUnavailable, unprivileged_user
from tests.conftest import missing_service
from tests.test_transport_security import Client, files, pki, refused, tls_listener

pytestmark = [pytest.mark.hostile, pytest.mark.integration]

COLLECTOR = "collector-1"
DEVICES = ["station-1", "station-2"]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    assert pki(folder, "init", "--site", "Hostile sessions") == 0
    assert pki(folder, "broker", "--host", "127.0.0.1") == 0
    assert pki(folder, "collector", COLLECTOR) == 0
    for device in DEVICES:
        assert pki(folder, "device", device) == 0
    return folder


@pytest.fixture
def tls_broker(tmp_path: Path, site: Path):
    try:
        b = Broker(tmp_path / "broker", listener=tls_listener(site)).start()
    except BrokerUnavailable as exc:
        missing_service("mosquitto", exc)
    yield b
    b.stop()


class Session:
    """A persistent MQTT v5 session (clean start off, as agents and collectors keep theirs) that
    records every time the broker closes it."""

    def __init__(self, broker: Broker, site: Path, name: str, client_id: str, clean_start: bool = False) -> None:
        self.closed = 0
        self.messages: list[bytes] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.tls_set_context(client_context(files(site, name)))
        self.client.on_connect = lambda c, u, f, reason, p: reason.is_failure or self.ready.set()
        self.client.on_disconnect = lambda c, u, f, reason, p: self._closed()
        self.client.on_message = lambda c, u, m: self.messages.append(m.payload)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, clean_start=clean_start, properties=properties)
        self.client.loop_start()
        assert self.ready.wait(10), f"{client_id} ({name}'s certificate) was not let in"

    def _closed(self) -> None:
        self.closed += 1
        self.ready.clear()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def known_client_ids() -> dict[str, str]:
    """Every client id the project's own clients use, by the certificate each runs under."""
    return {
        COLLECTOR: COLLECTOR,  # a collector's client_id is its certificate's name
        status_client_id(COLLECTOR): status_client_id(COLLECTOR),
        "station-2": agent_client_id("station-2"),
        ADMIN: ADMIN,
    }


def test_no_certificate_can_take_over_another_clients_session(site, tls_broker):
    """station-1's certificate connects as each known client, again and again, with clean start off:
    every victim stays connected, keeps its session and gets every message meant for it."""
    names = known_client_ids()
    victims = {name: Session(tls_broker, site, name, cid) for name, cid in names.items()}
    attackers = []
    try:
        for _ in range(3):
            for cid in [*names.values(), "collector-1", "bt-agent-station-2", "bt-agent-station-1-emit"]:
                attackers.append(Session(tls_broker, site, "station-1", cid))
                time.sleep(0.1)
        time.sleep(0.5)  # a kick would have been delivered by now
        assert {name: v.closed for name, v in victims.items()} == dict.fromkeys(names, 0)
    finally:
        for s in [*victims.values(), *attackers]:
            s.close()


def test_messages_queued_for_an_absent_collector_stay_its_own(site, tls_broker):
    """While the collector is away its session holds its share of the events; station-1's
    certificate connecting under the collector's id must not inherit them."""
    collector = Session(tls_broker, site, COLLECTOR, COLLECTOR)
    collector.client.subscribe("$share/collectors/bt/v1/+/events", qos=1)
    time.sleep(0.3)
    collector.close()
    device = Client(tls_broker, files(site, "station-2"), agent_client_id("station-2"))
    for n in range(20):
        assert not device.publish("bt/v1/station-2/events", f"event {n}".encode()).is_failure
    thief = Session(tls_broker, site, "station-1", COLLECTOR)
    time.sleep(0.5)
    thief.close()
    back = Session(tls_broker, site, COLLECTOR, COLLECTOR)
    try:
        waiting.wait_until(lambda: len(back.messages) >= 20, 10, "the 20 events queued for the collector")
        assert thief.messages == []
    finally:
        back.close()
        device.close()


def test_a_revoked_device_is_cut_off_while_connected(site, tls_broker):
    """`pki revoke --broker` applies the change to the running broker: the connected device is
    disconnected, and whatever it does before the broker re-reads the CRL is refused."""
    device = Client(tls_broker, files(site, "station-2"), agent_client_id("station-2"))
    other = Client(tls_broker, files(site, "station-1"), agent_client_id("station-1"))
    dropped = threading.Event()
    device.client.on_disconnect = lambda *a: dropped.set()
    try:
        assert not device.publish("bt/v1/station-2/events", b"before").is_failure
        assert pki(site, "revoke", "station-2", "--broker", f"{tls_broker.host}:{tls_broker.port}") == 0
        assert dropped.wait(10), "the broker must drop station-2 at once"
        waiting.wait_until(device.client.is_connected, 10, "paho to reconnect (the CRL is not re-read yet)")
        assert device.publish("bt/v1/station-2/events", b"after").is_failure
        assert device.subscribe("bt/v1/station-2/receipts").is_failure
        assert not other.publish("bt/v1/station-1/events", b"unaffected").is_failure
    finally:
        device.close()
        other.close()
    tls_broker.process.send_signal(signal.SIGHUP)
    revoked = client_context(files(site, "station-2"))
    waiting.wait_until(lambda: refused(tls_broker, revoked), 10, "the broker to refuse the revoked certificate")


def test_a_device_issued_with_broker_is_let_in_without_a_restart(site, tls_broker):
    collector = Client(tls_broker, files(site, COLLECTOR), COLLECTOR)
    assert pki(site, "device", "station-9", "--broker", f"{tls_broker.host}:{tls_broker.port}") == 0
    late = Client(tls_broker, files(site, "station-9"), agent_client_id("station-9"))
    try:
        assert not collector.subscribe("$share/collectors/bt/v1/+/events").is_failure
        assert not late.publish("bt/v1/station-9/events", b"at once").is_failure
        waiting.wait_until(lambda: collector.messages, 10, "station-9's event at the collector")
        assert late.subscribe("$share/collectors/bt/v1/+/events").is_failure
    finally:
        late.close()
        collector.close()


def test_an_unreachable_broker_is_one_clear_line_and_the_files_are_still_written(site, capsys):
    capsys.readouterr()
    assert pki(site, "device", "station-7", "--broker", "127.0.0.1:1") == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "restart the broker" in err and "Traceback" not in err
    assert "station-7" in (site / "broker" / "dynamic-security.json").read_text()


# -- the documented deployment -----------------------------------------------------------------------


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid for process {pid}")


def test_the_broker_runs_unprivileged_and_cannot_read_the_ca_key(site, tls_broker):
    user = unprivileged_user()
    if os.geteuid() == 0:
        assert _uid(tls_broker.process.pid) == user.pw_uid, "the tests' broker must not run as root"
        probe = subprocess.run(
            ["cat", str(Pki(site).ca_key_path)], user=user.pw_uid, group=user.pw_gid, capture_output=True
        )
        assert probe.returncode != 0, "the broker's user can read the CA key"
    assert not list((site / "broker").glob("ca.key")) and (site / "ca.key").exists()
    # and what the broker does read, it can re-read as itself: a revocation's CRL on SIGHUP
    assert pki(site, "revoke", "station-2") == 0
    tls_broker.process.send_signal(signal.SIGHUP)
    revoked = client_context(files(site, "station-2"))
    waiting.wait_until(lambda: refused(tls_broker, revoked), 10, "the broker to re-read the CRL")
    assert tls_broker.process.poll() is None
    assert refused(tls_broker, client_context(files(site, "station-1"))) == ""


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_a_device_cannot_make_the_broker_keep_large_messages(site, tls_broker):
    """One device publishing (and retaining) 8 MiB messages on its own topics: the broker closes the
    connection on each (a packet over the size it announced is a protocol error in MQTT v5), takes
    none of them, and does not grow by what was sent; an envelope of honest size passes."""
    before = _rss_mb(tls_broker.process.pid)
    big = bytes(8 * 1024 * 1024)
    for topic in ("bt/v1/station-1/events", "bt/v1/station-1/status"):
        for _ in range(4):
            device = Session(tls_broker, site, "station-1", agent_client_id("station-1"), clean_start=True)
            try:
                info = device.client.publish(topic, big, qos=1, retain=True)
                waiting.wait_until(lambda d=device: d.closed, 15, f"the broker to refuse {len(big)} bytes on {topic}")
                assert not info.is_published()
            finally:
                device.close()
    grown = _rss_mb(tls_broker.process.pid) - before
    assert grown < 16, f"the broker grew by {grown:.0f} MB after refusing 64 MiB"
    honest = Client(tls_broker, files(site, "station-1"), agent_client_id("station-1"))
    try:
        assert not honest.publish("bt/v1/station-1/events", bytes(16 * 1024)).is_failure
    finally:
        honest.close()
