"""Hostile broker sessions: devices holding a valid certificate that try to take the fleet's events,
QoS 0 floods during a store outage, and retained statuses meant to blind the operators.

Each runs on the real parts: mosquitto with configs/mosquitto-tls.conf and the files of
``battery-server pki``, real collector processes, a private PostgreSQL that is stopped, the real
dashboard's JSON API.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from battery_trace.protocol import keys
from battery_trace.server.pki import Pki
from battery_trace.server.store import Store
from battery_trace.server.web import status_listener
from hypothesis import given
from hypothesis import strategies as st

from battery_trace.tls import client_context
from harness import collectors, waiting
from harness.broker import Broker, BrokerUnavailable, free_port
from harness.publisher import Publisher
from tests.conftest import missing_service, private_cluster
from tests.test_transport_security import Client, files, pki, refused, tls_listener
from tests.world import T0, World

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


# -- statuses that would blind the operators ----------------------------------------------------------

NASTY_STATUSES = {
    "lone-surrogate": b'{"state": "online", "alarm": "\\udc00 disk"}',
    "backlog-1e20": b'{"state": "online", "backlog": 100000000000000000000}',
    "backlog-1e400": b'{"state": "online", "backlog": 1e400}',
    "lag-1e400": b'{"state": "online", "oldest_unreceipted_s": 1e400}',
    "lag-infinity": b'{"state": "online", "oldest_unreceipted_s": Infinity}',
    "lag-nan": b'{"state": "online", "oldest_unreceipted_s": NaN}',
    "time-minus-infinity": b'{"state": "online", "time": -Infinity}',
    "negative-backlog": b'{"state": "online", "backlog": -5, "time": 1e300}',
    "true-backlog": b'{"state": "online", "backlog": true}',
    "not-utf8": b'{"state": "\xff\xfe online"}',
    "utf16": '{"state": "online", "alarm": "\\ud800"}'.encode("utf-16"),
    "nested-lists": b"[" * 4000,
    "nested-objects": b'{"a": ' * 800 + b"1" + b"}" * 800,
    "nested-garbage": b'{"state": {"online": [1]}, "backlog": [1], "alarm": {"x": 1}, "time": "now"}',
    "control-alarm": b'{"state": "online", "alarm": "\\u0000\\u001b[2J"}',
    "long-alarm": b'{"state": "online", "alarm": "' + b"x" * 1000 + b'"}',
    "oversized": b'{"state": "online", "alarm": "' + b"x" * 5000 + b'"}',
    "not-an-object": b'"online"',
    "empty": b"",
}


def strict_json(raw: bytes) -> object:
    """What a browser's JSON.parse accepts: no NaN, no Infinity."""
    return json.loads(raw, parse_constant=lambda name: pytest.fail(f"/api/devices answered {name}"))


def api(url: str, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def retained(broker: Broker, statuses: dict[str, bytes]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="statuses", protocol=mqtt.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    for device, payload in statuses.items():
        client.publish(f"bt/v1/{device}/status", payload, qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def dashboard(tmp_path: Path, broker: Broker):
    """A real `battery-server run` with its dashboard, every device of NASTY_STATUSES enrolled, and
    their statuses retained at the broker before it starts (as after a restart)."""
    store = Store(f"sqlite:{tmp_path / 'record.sqlite'}")
    for device in [*NASTY_STATUSES, "good-1", "good-2"]:
        store.enroll(device, "gateway", keys.generate().public, None, 0.0)
    retained(broker, NASTY_STATUSES | {"good-1": b'{"state": "online", "backlog": 7, "alarm": "disk 91 %"}'})
    key_path = tmp_path / "server.key"
    keys.save_private(keys.generate(), key_path)
    port = free_port()
    config = collectors.write_config(tmp_path / "server.toml", store.url, broker, "c1", key_path, web_port=port)
    config.write_text(config.read_text() + f'token_file = "{tmp_path / "web.token"}"\n')
    (tmp_path / "web.token").write_text(secrets.token_urlsafe(32) + "\n")  # what `battery-server init` writes
    log = tmp_path / "server.log"
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "battery_trace.server.cli", "run", "-c", str(config)], stdout=out, stderr=out
        )
    collectors.wait_subscribed(log)
    yield {"url": f"http://127.0.0.1:{port}", "token": (tmp_path / "web.token").read_text().strip(), "proc": server}
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)
    store.close()


def test_no_status_a_device_retains_can_blind_the_operators(dashboard, broker):
    url, token, server = dashboard["url"], dashboard["token"], dashboard["proc"]

    def devices() -> dict[str, dict]:
        code, body = api(f"{url}/api/devices", token)
        assert code == 200, f"/api/devices answered {code}: {body[:300]!r}"
        return {row["device"]: row for row in strict_json(body)}

    def up() -> bool:
        try:
            return api(f"{url}/healthz", token)[0] == 200
        except urllib.error.URLError:
            return False

    waiting.wait_until(up, 20, "the dashboard", [server])
    waiting.wait_until(lambda: devices()["good-1"]["state"] == "online", 20, "good-1's retained status", [server])
    retained(broker, NASTY_STATUSES)  # again, live this time
    retained(broker, {"good-2": b'{"state": "online", "backlog": 3, "oldest_unreceipted_s": 12.5}'})
    waiting.wait_until(lambda: devices()["good-2"]["state"] == "online", 20, "a status sent after the nasty ones")
    shown = devices()
    assert (shown["good-1"]["backlog"], shown["good-1"]["alarm"]) == (7, "disk 91 %")
    assert (shown["good-2"]["backlog"], shown["good-2"]["lag_s"]) == (3, 12.5)
    assert shown["backlog-1e20"]["state"] == "online" and shown["backlog-1e20"]["backlog"] is None
    assert shown["lag-infinity"]["state"] == "online" and shown["lag-infinity"]["lag_s"] is None
    assert shown["lone-surrogate"]["alarm"] is None
    code, body = api(f"{url}/metrics", token)
    assert code == 200
    refused = {
        line.split('reason="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("bt_server_status_refused_total{")
    }
    assert {"bad_value", "not_json", "too_large", "not_an_object"} <= set(refused), refused
    assert refused["bad_value"] >= 2 * 13 and "failed" not in refused, refused  # each refused field, twice
    assert server.poll() is None


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


STATUS_FIELDS = ["state", "backlog", "oldest_unreceipted_s", "time", "alarm"]


@given(st.dictionaries(st.sampled_from([*STATUS_FIELDS, "other"]), JSONISH, max_size=6))
def test_what_is_kept_of_any_status_is_bounded_finite_and_valid(status):
    kept, refused = status_listener.clean(status)
    assert set(kept) | set(refused) == set(status) - {"other"}
    json.dumps(kept, allow_nan=False).encode("utf-8")  # finite, and UTF-8 all through
    for name in ("backlog", "oldest_unreceipted_s", "time"):
        assert name not in kept or 0 <= kept[name] <= 10**14


# -- QoS 0 floods ------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def flood_qos0(broker: Broker, topic: str, count: int, size: int) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flood", protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(0)
    client.connect(broker.host, broker.port)
    client.loop_start()
    payload = bytes(size)
    infos = [client.publish(topic, payload, qos=0) for _ in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def stoppable_cluster():
    with private_cluster("bt-pg-qos0-") as cluster:
        yield cluster


def test_qos0_events_during_a_store_outage_do_not_grow_the_collector(tmp_path, broker, stoppable_cluster):
    """With the database stopped, QoS 1 events wait unacknowledged (Receive Maximum); a device flooding
    QoS 0 "events" (160 MB here) must not pile up in the collector meanwhile: they are refused, counted,
    and the honest events are all stored once the database is back."""
    url = stoppable_cluster.create_database()
    store = Store(url)
    world = World(store)
    station = world.device("station-1", "gateway")
    health = {"code": "0RJPEA00HAU0AAG1C3000123", "health": {"soc_pct": 70}}
    honest = [("bt/v1/station-1/events", station.seal("health", health, T0 + n * 1000)) for n in range(300)]
    key_path = tmp_path / "server.key"
    keys.save_private(keys.generate(), key_path)
    log = tmp_path / "c1.log"
    collector = collectors.start(
        collectors.write_config(tmp_path / "c1.toml", url, broker, "c1", key_path, receive_max=100), log
    )
    collectors.wait_subscribed(log)
    publisher = Publisher(broker, "station-1")
    try:
        publisher.publish(honest[:100])
        waiting.wait_until(lambda: store.counts()["events"] == 100, 30, "the first events", [collector])
        store.close()
        stoppable_cluster.stop("immediate")
        # Fewer than the Receive Maximum: the collector holds them unacknowledged and goes on reading.
        publisher.publish(honest[100:150])
        time.sleep(1)
        before = rss_mb(collector.pid)
        flood_qos0(broker, "bt/v1/station-1/events", count=20_000, size=8192)
        time.sleep(3)
        grown = rss_mb(collector.pid) - before
        assert collector.poll() is None, "the collector must survive the outage and the flood"
        assert grown < 40, f"the collector grew by {grown:.0f} MB during a QoS 0 flood of 160 MB"
        stoppable_cluster.start()
        store = Store(url)
        publisher.publish(honest[150:])
        waiting.wait_until(lambda: store.counts()["events"] == 300, 60, "every honest event", [collector])
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=30)
        publisher.close()
        store.close()
    assert collectors.counters(log)["refused:qos0"] > 0


# -- a CRL that runs out -----------------------------------------------------------------------------


def test_a_crl_that_ran_out_is_renewed_by_the_timer_command_and_the_broker_lets_clients_in(
    fleet_site, tmp_path, capsys
):
    """Past the CRL's next update the broker refuses every client. `pki renew-crl` (what the systemd
    timer runs) re-signs it when it is due, says when it next expires (also as a metric), and after
    the broker's reload everyone is let in again; run again, it leaves a fresh CRL alone."""
    site = Pki(fleet_site)
    site.write_crl(now=dt.datetime.now(dt.UTC) - dt.timedelta(days=366))  # signed a year and a day ago
    try:
        broker = Broker(tmp_path / "crl-broker", listener=tls_listener(fleet_site)).start()
    except BrokerUnavailable as exc:
        missing_service("mosquitto", exc)
    station = client_context(files(fleet_site, "station-1"))
    metric = tmp_path / "crl.prom"
    try:
        assert refused(broker, station), "an expired CRL must shut everyone out (or this test proves nothing)"
        capsys.readouterr()
        assert pki(fleet_site, "renew-crl", "--metrics-file", str(metric), "--json") == 0
        answer = json.loads(capsys.readouterr().out)
        assert answer["renewed"] is True
        left = dt.datetime.fromisoformat(answer["next_update"]) - dt.datetime.now(dt.UTC)
        assert left > dt.timedelta(days=300)
        (sample,) = [line for line in metric.read_text().splitlines() if not line.startswith("#")]
        value = float(sample.removeprefix("bt_pki_crl_next_update_timestamp_seconds "))
        assert abs(value - dt.datetime.fromisoformat(answer["next_update"]).timestamp()) < 1
        broker.process.send_signal(signal.SIGHUP)
        waiting.wait_until(lambda: refused(broker, station) == "", 10, "the broker to let station-1 in again")
        assert pki(fleet_site, "renew-crl", "--json") == 0
        assert json.loads(capsys.readouterr().out)["renewed"] is False
    finally:
        broker.stop()


def test_a_crl_about_to_run_out_degrades_healthz_and_shows_in_metrics(fleet_site, tmp_path, broker):
    """The collector is told where the broker's CRL is ([pki] crl): two weeks before it runs out
    /healthz says so (503, with the command that renews it) and /metrics carries its expiry."""
    site = Pki(fleet_site)
    site.write_crl(now=dt.datetime.now(dt.UTC) - dt.timedelta(days=360))  # five days left
    key_path = tmp_path / "server.key"
    keys.save_private(keys.generate(), key_path)
    port = free_port()
    url = f"sqlite:{tmp_path / 'record.sqlite'}"
    config = collectors.write_config(tmp_path / "server.toml", url, broker, "c1", key_path, web_port=port)
    (tmp_path / "web.token").write_text(secrets.token_urlsafe(32) + "\n")
    config.write_text(config.read_text() + f'token_file = "{tmp_path / "web.token"}"\n[pki]\ncrl = "{site.crl_path}"\n')
    log = tmp_path / "server.log"
    server = collectors.start(config, log)
    try:
        collectors.wait_subscribed(log)

        def health() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
            except OSError:
                return 0, ""

        waiting.wait_until(lambda: health()[0] == 503, 30, "/healthz to warn of the CRL", [server])
        assert "renew-crl" in health()[1] and "CRL" in health()[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        (sample,) = [line for line in text.splitlines() if line.startswith("bt_server_crl_next_update_timestamp")]
        assert abs(float(sample.split()[-1]) - site.crl_next_update().timestamp()) < 1
        site.renew_crl()
        waiting.wait_until(lambda: health()[0] == 200, 30, "/healthz to be content once it is renewed", [server])
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)
