"""The intake end to end: real collector processes, a real mosquitto, both databases.

Hostile and broken messages are quarantined with their reason; a collector killed with SIGKILL loses
and duplicates nothing; two collectors in one shared-subscription group store every event once; a
database outage acknowledges nothing and loses nothing.
"""

from __future__ import annotations

import signal
import time

import pytest
from battery_trace.protocol import cbor, envelope, events, keys, receipts
from battery_trace.server.store import Store, StoreUnavailable

from harness import collectors, waiting
from harness.publisher import Publisher
from tests.conftest import private_cluster
from tests.world import T0, World

pytestmark = pytest.mark.integration
PACK = "0RJPEA00HAU0AAG1C3000123"
HEALTH = {"code": PACK, "health": {"soc_pct": 70, "voltage_v": 350.5}}


def wait_until(condition, timeout: float, what: str, procs=()) -> None:
    """harness.waiting.wait_until, counting a store that cannot answer yet (an outage) as "not yet"."""

    def holds() -> bool:
        try:
            return condition()
        except StoreUnavailable:
            return False

    waiting.wait_until(holds, timeout, what, procs)


@pytest.fixture
def server(tmp_path, broker, store_url):
    """A store with its world of devices, and a way to start collectors against it."""
    store = Store(store_url)
    key_path = tmp_path / "server.key"
    keys.save_private(keys.generate(), key_path)
    procs = []

    def start(name: str = "c1", **kw):
        cfg = collectors.write_config(tmp_path / f"{name}.toml", store_url, broker, name, key_path, **kw)
        log = tmp_path / f"{name}.log"
        confirmed = log.read_text().count("subscribed to") if log.exists() else 0
        proc = collectors.start(cfg, log)
        procs.append(proc)
        collectors.wait_subscribed(log, after=confirmed)
        return proc

    world = World(store)
    world.start = start
    world.server_key = keys.load_private(key_path)
    world.logs = tmp_path
    yield world
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)
    store.close()


def stored(world: World) -> int:
    return world.store.counts()["events"]


def rejected(world: World) -> dict[str, int]:
    return world.store.counts()["rejected"]


def test_hostile_and_broken_messages_are_quarantined_with_their_reason(server, broker):
    world = server
    s1, s2 = world.device("station-1", "swap_operator"), world.device("station-2", "swap_operator")
    s3 = world.device("station-3", "swap_operator")
    world.store.revoke("station-3", time.time())
    stranger = keys.generate()

    def event(device, event_type="health", fields=None):
        return device.seal(event_type, HEALTH if fields is None else fields, T0 + device.seq * 1000)

    def signed_map(device, m):
        return envelope.sign(cbor.encode({"v": 1, "device": device.name, **m}), device.key)

    def forged(device):  # claims the device's key id, signed by someone else
        protected = cbor.encode({1: -8, 4: device.key.public.kid})
        payload = cbor.encode({"v": 1, "device": device.name, "seq": 99})
        signature = stranger.sign(cbor.encode(["Signature1", protected, b"", payload]))
        return cbor.encode(cbor.Tag(18, [protected, {}, payload, signature]))

    first = event(s1)
    good = [first, event(s1)]
    s1.prev = bytes(32)  # a tampered chain: validly signed, but linked to nothing
    good.append(event(s1))
    good.append(event(s1, fields={"code": "0RJXEA00HAU0AAG1C3000123", "health": {"soc_pct": 1}}))
    # seq 1 again with other content, validly signed: a fork in the device's chain
    fork = envelope.sign(
        events.encode(events.Event("station-1", 1, bytes(32), T0 + 5, "health", "label", HEALTH)), s1.key
    )
    topic = "bt/v1/{}/events".format
    hostile = [
        (topic("station-1"), forged(s1), "bad_signature"),
        (topic("station-1"), envelope.sign(b"\xa0", stranger), "unknown_key"),
        (topic("station-3"), event(s3), "key_revoked"),
        (topic("station-2"), event(s1), "device_mismatch"),
        (
            topic("station-2"),
            event(s2, "produced", {"code": PACK, "chemistry": "lfp", "rated_capacity_ah": 1, "rated_energy_kwh": 1}),
            "role_not_allowed",
        ),
        (topic("station-1"), fork, "sequence_reused"),
        (topic("station-1"), b"\xd2\x84\x43\xa1\x01", "malformed"),
        (topic("station-1"), b"hello, not COSE", "malformed"),
        (topic("station-1"), bytes(70_000), "too_large"),
        (topic("station-2"), signed_map(s2, {"seq": 1, "type": "exploded"}), "schema"),
        (topic("station-2"), signed_map(s2, {"seq": 1, "type": "health", "source": "label"}), "schema"),
    ]
    publisher = Publisher(broker, "test-device", subscribe="bt/v1/+/receipts")
    collector = world.start()
    publisher.publish([(topic("station-1"), raw) for raw in good])
    wait_until(lambda: stored(world) == 4, 30, "the good events", [collector])
    publisher.publish([(t, raw) for t, raw, _ in hostile] + [(topic("station-1"), first)])  # and a plain replay
    expected = {}
    for *_, reason in hostile:
        expected[reason] = expected.get(reason, 0) + 1
    wait_until(lambda: rejected(world) == expected, 30, f"quarantine to hold {expected}", [collector])
    assert stored(world) == 4  # nothing hostile stored, the replay not stored twice
    open_kinds = sorted(f["kind"] for f in world.store.findings(open_only=True))
    assert open_kinds == ["chain_break", "chain_break", "invalid_code"]  # the tampered link and the fork
    rows = world.store.rejects(limit=100)
    assert all(r["raw"] and r["topic"] and r["received_at"] for r in rows)
    # Signed receipts came back for station-1; the last one covers its chain up to the tampered link
    # (seq 3 is stored as evidence, but links to nothing: no receipt may vouch for it), with the hash there.
    wait_until(lambda: any(m.topic == "bt/v1/station-1/receipts" for m in publisher.received), 10, "receipts")
    last = [m for m in publisher.received if m.topic == "bt/v1/station-1/receipts"][-1]
    receipt = receipts.verify(last.payload, [world.server_key.public], "station-1", {s1.key.public.kid})
    assert (receipt.watermark, receipt.hash) == (2, envelope.envelope_hash(good[1]))
    publisher.close()


def fleet(world: World, devices: int, per_device: int) -> list[tuple[str, bytes]]:
    """Sealed health events of several stations, interleaved the way they would arrive."""
    stations = [world.device(f"station-{i}", "swap_operator") for i in range(devices)]
    return [
        (f"bt/v1/{s.name}/events", s.seal("health", HEALTH, T0 + n * 1000)) for n in range(per_device) for s in stations
    ]


def test_a_collector_killed_mid_stream_loses_and_duplicates_nothing(server, broker):
    world = server
    messages = fleet(world, devices=4, per_device=500)
    collector = world.start(batch_ms=50, batch_max=100, receive_max=200)
    publisher = Publisher(broker, "test-fleet")
    publisher.publish(messages)
    wait_until(lambda: stored(world) >= 200, 30, "the first batches", [collector])
    collector.send_signal(signal.SIGKILL)
    collector.wait()
    at_kill = stored(world)
    assert at_kill < len(messages), "the collector finished before it could be killed; send more"
    restarted = world.start(batch_ms=50, batch_max=100, receive_max=200)
    wait_until(lambda: stored(world) == len(messages), 60, "every event after the restart", [restarted])
    time.sleep(1)
    assert stored(world) == len(messages)
    assert all(d["watermark"] == 500 for d in world.store.devices())
    publisher.close()


def test_two_collectors_in_one_group_store_every_event_once(server, broker):
    world = server
    messages = fleet(world, devices=6, per_device=300)
    first = world.start("c1", batch_ms=20, batch_max=50)
    second = world.start("c2", batch_ms=20, batch_max=50)
    publisher = Publisher(broker, "test-fleet")
    publisher.publish(messages)
    wait_until(lambda: stored(world) == len(messages), 60, "every event", [first, second])
    assert all(d["watermark"] == 300 for d in world.store.devices())
    assert world.store.findings() == []  # no false chain breaks from interleaved collectors
    for p in (first, second):
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)
    shares = [collectors.counters(world.logs / f"{name}.log")["received"] for name in ("c1", "c2")]
    assert all(n > 0 for n in shares), f"both collectors should have taken part: {shares}"
    assert sum(shares) == len(messages)
    publisher.close()


def test_of_two_events_signed_under_one_sequence_number_the_first_to_arrive_is_the_record(server, broker):
    """Verifier threads finish in any order; the record must follow arrival order all the same."""
    world = server
    originals, messages = {}, []
    for i in range(60):
        device = world.device(f"station-{i}", "swap_operator")
        original = device.seal("health", HEALTH, T0)
        fork = envelope.sign(
            events.encode(events.Event(device.name, 1, events.ZERO_HASH, T0 + 5, "health", "label", HEALTH)),
            device.key,
        )
        originals[device.name] = envelope.envelope_hash(original)
        messages += [(f"bt/v1/{device.name}/events", original), (f"bt/v1/{device.name}/events", fork)]
    collector = world.start(batch_ms=1, batch_max=1)  # one message per batch: the most room to overtake
    publisher = Publisher(broker, "test-forks")
    publisher.publish(messages)
    wait_until(lambda: rejected(world).get("sequence_reused") == 60, 60, "every fork quarantined", [collector])
    with world.store.db.reading() as tx:
        kept = dict(tx.all("SELECT device, hash FROM events"))
    assert {name: bytes(h) for name, h in kept.items()} == originals
    publisher.close()


@pytest.fixture
def outage_cluster():
    with private_cluster("bt-pg-outage-") as cluster:
        yield cluster


def test_a_database_outage_acknowledges_nothing_and_loses_nothing(tmp_path, broker, outage_cluster):
    url = outage_cluster.create_database()
    store = Store(url)
    world = World(store)
    key_path = tmp_path / "server.key"
    keys.save_private(keys.generate(), key_path)
    messages = fleet(world, devices=3, per_device=200)
    cfg = collectors.write_config(tmp_path / "c1.toml", url, broker, "c1", key_path, receive_max=100)
    collector = collectors.start(cfg, tmp_path / "c1.log")
    collectors.wait_subscribed(tmp_path / "c1.log")
    publisher = Publisher(broker, "test-fleet", subscribe="bt/v1/+/receipts")
    try:
        publisher.publish(messages[:300])
        wait_until(lambda: stored(world) == 300, 30, "the first half", [collector])
        store.close()
        outage_cluster.stop("immediate")
        receipts_before = len(publisher.received)
        publisher.publish(messages[300:])
        time.sleep(3)  # the collector holds what it has, unacknowledged; the broker keeps the rest
        assert collector.poll() is None, "the collector must survive the outage"
        assert len(publisher.received) == receipts_before, "no receipt may be sent while nothing can be stored"
        outage_cluster.start()
        wait_until(lambda: stored(world) == len(messages), 60, "every event after the outage", [collector])
        assert all(d["watermark"] == 200 for d in world.store.devices())
        assert "store unavailable" in (tmp_path / "c1.log").read_text()
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(timeout=20)
        publisher.close()
        store.close()
