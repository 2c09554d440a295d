"""Transport security on a real mosquitto running configs/mosquitto-tls.conf with files from
``battery-server pki``: TLS only, a client certificate for every device and collector, per-device
ACLs, revocation, and agents and collectors that never speak plaintext once TLS is configured."""

from __future__ import annotations

import json
import signal
import ssl
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from battery_trace.firmware_stubs.jbd_bms import JbdBms
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import keys
from battery_trace.server.cli import main as server_main
from battery_trace.server.store import Store
from cryptography import x509

from battery_trace.tls import TlsFiles, client_context
from harness import agents, collectors
from harness.broker import Broker, BrokerUnavailable, reachable
from harness.waiting import wait_until
from tests.conftest import missing_service

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mosquitto-tls.conf"
CODE = "0RJPEA00HAU0AAG1C3000123"


def pki(folder: Path, *args: str) -> int:
    return server_main(["pki", *args, "--dir", str(folder)])


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "pki"
    assert pki(folder, "init", "--site", "Test swap network") == 0
    assert pki(folder, "broker", "--host", "127.0.0.1", "--host", "localhost") == 0
    assert pki(folder, "collector", "collector-1") == 0
    for device in ("station-1", "station-2"):
        assert pki(folder, "device", device) == 0
    return folder


def tls_listener(site: Path) -> str:
    """configs/mosquitto-tls.conf as shipped, pointed at the test's PKI folder and a free loopback port
    (persistence is the harness's own); the PKI's broker/ folder is handed to the broker's user, as
    the operator guide says."""
    broker_dir = reachable(site / "broker")
    lines = []
    for line in CONFIG.read_text().splitlines():
        if line.startswith(("persistence", "autosave_interval", "max_queued_messages")):
            continue
        if line.startswith("listener "):
            line = "listener {port} 127.0.0.1"
        lines.append(line.replace("/etc/mosquitto/battery-trace/broker", str(broker_dir)))
    return "\n".join(lines) + "\n"


@pytest.fixture
def tls_broker(tmp_path: Path, site: Path):
    try:
        b = Broker(tmp_path / "broker", listener=tls_listener(site)).start()
    except BrokerUnavailable as exc:
        missing_service("mosquitto", exc)
    yield b
    b.stop()


def files(site: Path, name: str | None) -> TlsFiles:
    if name is None:
        return TlsFiles(str(site / "ca.pem"))
    return TlsFiles(str(site / "ca.pem"), str(site / "issued" / f"{name}.pem"), str(site / "issued" / f"{name}.key"))


class Client:
    """A paho MQTT v5 client over TLS as NAME, recording what the broker answers."""

    def __init__(self, broker: Broker, tls: TlsFiles | None, client_id: str) -> None:
        self.connected = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, object] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            self.client.tls_set_context(client_context(tls))
        self.client.on_connect = lambda c, u, f, reason, p: reason.is_failure or self.connected.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_publish = lambda c, u, mid, reason, p: self.acks.__setitem__(mid, reason)
        self.client.on_subscribe = lambda c, u, mid, reasons, p: self.acks.__setitem__(mid, reasons[0])
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.connected.wait(10), f"{client_id} was not let in"

    def ack(self, mid: int) -> object:
        wait_until(lambda: mid in self.acks, 10, f"the broker's answer to message {mid}")
        return self.acks[mid]

    def publish(self, topic: str, payload: bytes) -> object:
        return self.ack(self.client.publish(topic, payload, qos=1).mid)

    def subscribe(self, topic: str) -> object:
        return self.ack(self.client.subscribe(topic, qos=1)[1])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def refused(broker: Broker, context: ssl.SSLContext | None) -> str:
    """Try one MQTT CONNECT; return how the broker refused it, or "" when it let the client in."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5)
    if context:
        client.tls_set_context(context)
    answers: list[object] = []
    client.on_connect = lambda c, u, f, reason, p: answers.append(reason)
    try:
        client.connect(broker.host, broker.port)
    except (ssl.SSLError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    for _ in range(50):
        if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
            return "connection closed"
        if answers:
            break
    client.disconnect()
    if answers and not answers[0].is_failure:
        return ""
    return f"CONNACK {answers[0]}" if answers else "no CONNACK"


# -- the PKI itself ----------------------------------------------------------------------------------


def test_pki_keeps_keys_private_and_refuses_to_replace_them(site, capsys):
    for key in [site / "ca.key", *(site / "issued").glob("*.key")]:
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert site.stat().st_mode & 0o777 == 0o711 and (site / "issued").stat().st_mode & 0o777 == 0o700
    assert pki(site, "init", "--site", "again") == 1
    assert pki(site, "device", "station-1") == 1  # one active certificate per name
    assert pki(site, "device", "Station-3") == 1  # a certificate name is a device id, and this is not one
    err = capsys.readouterr().err
    assert "already holds a CA" in err and "already has an active certificate" in err and "upper case" in err
    cert = x509.load_pem_x509_certificate((site / "issued" / "station-1.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=station-1"


def test_a_validity_that_is_not_a_number_of_days_is_a_usage_error(site, capsys):
    for days in ("0", "-3", "soon"):
        with pytest.raises(SystemExit) as exit_:
            pki(site, "device", "station-3", "--days", days)
        assert exit_.value.code == 2
    assert "valid: 1..36500" in capsys.readouterr().err
    assert not (site / "issued" / "station-3.pem").exists()


def test_revocation_rewrites_the_crl_and_the_access_rules(site, capsys):
    assert "collector-1" in (site / "broker" / "dynamic-security.json").read_text()
    capsys.readouterr()
    assert pki(site, "revoke", "collector-1", "--json") == 0
    serial = json.loads(capsys.readouterr().out)["revoked"][0]["serial"]
    crl = x509.load_pem_x509_crl((site / "broker" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert "collector-1" not in (site / "broker" / "dynamic-security.json").read_text()
    assert pki(site, "list", "--json") == 0
    listing = {(c["name"], c["revoked_at"] is None) for c in json.loads(capsys.readouterr().out)}
    assert ("collector-1", False) in listing and ("station-1", True) in listing
    assert pki(site, "revoke", "nobody") == 1


# -- on the broker -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_device_publishes_and_reads_only_its_own_topics(site, tls_broker):
    collector = Client(tls_broker, files(site, "collector-1"), "collector-1")
    device = Client(tls_broker, files(site, "station-1"), "bt-agent-station-1")
    try:
        assert not collector.subscribe("$share/collectors/bt/v1/+/events").is_failure
        assert not device.publish("bt/v1/station-1/events", b"mine").is_failure
        assert device.publish("bt/v1/station-2/events", b"forged").is_failure  # not authorised
        assert device.publish("bt/v1/station-2/receipts", b"forged").is_failure
        assert not device.subscribe("bt/v1/station-1/receipts").is_failure
        for other in ("bt/v1/station-2/receipts", "bt/v1/+/events"):  # tests/test_hostile_broker.py: all of them
            assert device.subscribe(other).is_failure
        wait_until(lambda: collector.messages, 10, "the device's own event at the collector")
        assert collector.messages == [("bt/v1/station-1/events", b"mine")]
        assert not collector.publish("bt/v1/station-2/receipts", b"not yours").is_failure
        assert not collector.publish("bt/v1/station-1/receipts", b"receipt").is_failure
        wait_until(lambda: device.messages, 10, "the receipt at the device")
        assert device.messages == [("bt/v1/station-1/receipts", b"receipt")]  # nobody else's receipts or events
        assert collector.publish("bt/v1/station-1/events", b"collector posing as a device").is_failure
    finally:
        collector.close()
        device.close()


@pytest.mark.integration
def test_plaintext_no_certificate_and_a_foreign_ca_are_refused(site, tls_broker, tmp_path):
    assert refused(tls_broker, client_context(files(site, "station-1"))) == ""  # the probe can tell
    assert refused(tls_broker, None)  # plaintext MQTT on the TLS port
    assert refused(tls_broker, client_context(files(site, None)))  # TLS, but no client certificate
    other = tmp_path / "other-pki"
    assert pki(other, "init", "--site", "Somebody else") == 0
    assert pki(other, "device", "station-1") == 0  # the right name from the wrong CA
    impostor = files(other, "station-1")
    foreign = client_context(TlsFiles(str(site / "ca.pem"), impostor.cert, impostor.key))
    assert refused(tls_broker, foreign)


@pytest.mark.integration
def test_a_revoked_device_is_refused_once_the_broker_reloads(site, tls_broker):
    Client(tls_broker, files(site, "station-2"), "bt-agent-station-2").close()
    assert pki(site, "revoke", "station-2") == 0
    tls_broker.process.send_signal(signal.SIGHUP)  # what the operator guide says to do
    revoked = client_context(files(site, "station-2"))
    wait_until(lambda: refused(tls_broker, revoked), 10, "the broker to refuse the revoked certificate")
    Client(tls_broker, files(site, "station-1"), "bt-agent-station-1").close()  # the others still get in


@pytest.mark.integration
def test_an_agent_and_a_collector_over_mutual_tls_store_and_receipt(site, tls_broker, tmp_path):
    """The whole path over the secured broker: agent -> TLS -> collector -> record -> receipt -> agent."""
    server_key = tmp_path / "server.key"
    keys.save_private(keys.generate(), server_key)
    url = f"sqlite:{tmp_path / 'record.sqlite'}"
    store = Store(url)
    device_key = tmp_path / "station-1.key"
    keys.save_private(keys.generate(), device_key)
    store.enroll("station-1", "gateway", keys.load_private(device_key).public, None, 0.0)
    collector_config = collectors.write_config(tmp_path / "collector.toml", url, tls_broker, "collector-1", server_key)
    _with_tls(collector_config, files(site, "collector-1"))
    collector = collectors.start(collector_config, tmp_path / "collector.log")
    link = PtyLink(tmp_path / "bms")
    bms = JbdBms(link)
    bms.start()
    body = agents.jbd_slot(link.path, CODE)
    server_public = keys.load_private(server_key).public.hex
    config, port = agents.write_config(
        tmp_path / "a.toml", "station-1", device_key, server_public, tls_broker, "gateway", body, health_interval_s=0.3
    )
    _with_tls(config, files(site, "station-1"))
    agent = agents.start(config, tmp_path / "agent.log")
    try:
        collectors.wait_subscribed(tmp_path / "collector.log")
        wait_until(lambda: len(list(store.export(0, 4e12))) >= 3, 30, "events stored over TLS", [agent, collector])
        wait_until(lambda: (agents.status(port) or {}).get("uplink", {}).get("receipts", 0) >= 1, 30, "a receipt")
    finally:
        agents.stop(agent)
        collector.terminate()
        collector.wait(20)
        bms.stop()
        link.close()
        store.close()


@pytest.mark.integration
def test_with_tls_configured_the_agent_never_talks_plaintext(site, broker, tmp_path):
    """The broker here speaks only plaintext: a TLS-configured agent must refuse it, not fall back."""
    device_key = tmp_path / "station-1.key"
    keys.save_private(keys.generate(), device_key)
    seen: list[bytes] = []
    link = PtyLink(tmp_path / "bms")
    bms = JbdBms(link)
    bms.start()
    body = agents.jbd_slot(link.path, CODE)
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spy", protocol=mqtt.MQTTv5)
    spy.on_message = lambda c, u, m: seen.append(m.payload)
    spy.connect(broker.host, broker.port)
    spy.subscribe("#", qos=1)
    spy.loop_start()
    config, port = agents.write_config(
        tmp_path / "a.toml",
        "station-1",
        device_key,
        keys.generate().public.hex,
        broker,
        "gateway",
        body,
        health_interval_s=0.3,
    )
    _with_tls(config, files(site, "station-1"))
    agent = agents.start(config, tmp_path / "agent.log")
    try:
        wait_until(lambda: (agents.status(port) or {}).get("sealer", {}).get("sealed", 0) >= 5, 20, "sealing", [agent])
        report = agents.status(port)
        assert report["uplink"]["connected"] is False and report["uplink"].get("connects", 0) == 0
        assert report["uplink"].get("disconnects", 0) >= 1  # it tried, over TLS, and was refused
        assert seen == []  # not one byte of an event, a status or a will went over plaintext
    finally:
        agents.stop(agent)
        spy.loop_stop()
        bms.stop()
        link.close()


def _with_tls(config: Path, tls: TlsFiles) -> None:
    config.write_text(
        config.read_text().replace(
            "[mqtt]\n", f'[mqtt]\ntls_ca = "{tls.ca}"\ntls_cert = "{tls.cert}"\ntls_key = "{tls.key}"\n'
        )
    )
