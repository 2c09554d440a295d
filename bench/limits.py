"""The limits a collector is compared with, measured on this machine in the same run (DESIGN.md §10).

- receive: messages per second a plain MQTT v5 subscriber gets from the broker, acknowledging only;
- verify: Ed25519 verifications per second on one thread: PyNaCl per call, the collector's lock-free
  batch call, ``cryptography``; and how the first two fare beside a busy Python thread;
- insert: event rows per second into the store, in batched transactions.

Next to them, the collector's own two stages, each alone on one thread, so a reader can see where a
collector's time goes beyond the three limits:

- check: parse the envelope, look up the key, verify, decode the payload deterministically and
  validate the event (server/verify.py), per event;
- commit: the store's batch commit (events, chains, codes, rules, findings) and the receipts.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
from battery_trace.protocol import envelope
from battery_trace.protocol.keys import PrivateKey, PublicKey
from battery_trace.server import batch_verify, receipts, verify
from battery_trace.server.records import Accepted
from battery_trace.server.store import Store
from battery_trace.server.store.db import Database
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness.broker import Broker
from harness.publisher import Publisher

COLUMNS = (
    ("kid", "blob"),
    ("seq", "bigint"),
    ("device", "text"),
    ("type", "text"),
    ("device_time_ms", "bigint"),
    ("hash", "blob"),
    ("body", "text"),
    ("envelope", "blob"),
)


def composed(*rates: float) -> float:
    """The ceiling when per-event costs add up: 1 / (1/a + 1/b + ...)."""
    return 1 / sum(1 / r for r in rates)


def verify_rates(sealed: list[bytes], public: dict[bytes, PublicKey], seconds: float = 2.0) -> dict[str, float]:
    """Ed25519 checks per second on one thread: PyNaCl one call per signature, the collector's batch
    call (server/batch_verify.py), ``cryptography``; and the first two beside a thread that runs
    Python code all the time, as a collector's main thread does (``*_beside_busy``)."""
    items = []
    for raw in sealed[:2000]:
        env = envelope.decode(raw)
        items.append((public[env.kid], env.sig_structure(), env.signature))
    openssl = [(Ed25519PublicKey.from_public_bytes(k.raw), m, s) for k, m, s in items]

    def per_call() -> None:
        for k, m, s in items:
            k.verify(m, s)

    def with_cryptography() -> None:
        for k, m, s in openssl:
            k.verify(s, m)

    def timed(run: Callable[[], None]) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            n += len(items)
        return n / (time.perf_counter() - start)

    def beside_busy(run: Callable[[], None]) -> float:
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                sum(range(1000))  # interpreted work that holds the lock, like checking events

        thread = threading.Thread(target=busy)
        thread.start()
        try:
            start = time.perf_counter()
            run()
            return len(items) / (time.perf_counter() - start)
        finally:
            stop.set()
            thread.join()

    return {
        "pynacl": timed(per_call),
        "batch": timed(lambda: batch_verify.verify_all(items)),
        "cryptography": timed(with_cryptography),
        "pynacl_beside_busy": beside_busy(per_call),
        "batch_beside_busy": beside_busy(lambda: batch_verify.verify_all(items)),
    }


def receive_rate(broker: Broker, messages: list[tuple[str, bytes]]) -> float:
    """Broker -> one subscriber: queue the messages for an offline persistent session, then drain it."""
    client_id = f"bench-receive-{uuid.uuid4().hex[:8]}"
    # A group of its own: an earlier run's session in the same group would take its share of the messages.
    topic = f"$share/{client_id}/bt/v1/+/events"
    done = threading.Event()
    count = 0

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        nonlocal count
        count += 1
        if count >= len(messages):
            done.set()

    def connect() -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = 2000
        subscribed = threading.Event()
        c.on_connect = lambda cl, *a: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = on_message
        c.connect(broker.host, broker.port, clean_start=False, properties=props)
        c.loop_start()
        subscribed.wait(10)
        return c

    first = connect()
    first.disconnect()
    first.loop_stop()
    publisher = Publisher(broker, f"bench-pub-{uuid.uuid4().hex[:8]}")
    publisher.publish(messages)
    publisher.close()
    start = time.perf_counter()
    c = connect()
    done.wait(600)
    elapsed = time.perf_counter() - start
    ending = Properties(PacketTypes.DISCONNECT)
    ending.SessionExpiryInterval = 0  # the broker forgets the session: nothing queues for it afterwards
    c.disconnect(properties=ending)
    c.loop_stop()
    if count < len(messages):
        raise RuntimeError(f"the subscriber received {count} of {len(messages)} messages in {elapsed:.0f} s")
    return count / elapsed


def insert_rate(url: str, rows: list[tuple], batch: int = 500) -> float:
    """Event rows per second, ``batch`` rows per transaction, into a scratch table shaped like ``events``,
    the way the store inserts events (PostgreSQL: COPY)."""
    db = Database(url)
    types = {"sqlite": "BLOB", "postgresql": "BYTEA"}[db.dialect.name]
    with db.transaction() as tx:
        tx.execute("DROP TABLE IF EXISTS bench_events")
        tx.execute(
            f"CREATE TABLE bench_events (kid {types} NOT NULL, seq BIGINT NOT NULL, device TEXT NOT NULL, "
            f"type TEXT NOT NULL, device_time_ms BIGINT NOT NULL, hash {types} NOT NULL, body TEXT NOT NULL, "
            f"envelope {types} NOT NULL, PRIMARY KEY (kid, seq))"
        )
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        with db.transaction() as tx:
            tx.insert_rows("bench_events", COLUMNS, rows[i : i + batch])
    elapsed = time.perf_counter() - start
    with db.transaction() as tx:
        tx.execute("DROP TABLE bench_events")
    db.close()
    return len(rows) / elapsed


def publish_rate(broker: Broker, messages: list[tuple[str, bytes]], in_flight: int) -> float:
    """One MQTT v5 connection publishing at QoS 1 with ``in_flight`` unacknowledged messages at most
    (an agent's window): messages per second until the broker has acknowledged them all."""
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-push-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )
    c.max_inflight_messages_set(in_flight)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    start = time.perf_counter()
    infos = [c.publish(topic, raw, qos=1) for topic, raw in messages]
    for info in infos:
        info.wait_for_publish(60)
    elapsed = time.perf_counter() - start
    c.disconnect()
    c.loop_stop()
    return len(messages) / elapsed


def stage_rates(store: Store, messages: list[tuple[str, bytes]], batch: int = 500) -> dict[str, float]:
    """Events per second through the collector's check stage and its commit stage, one thread each,
    in batches as the collector makes them; ``store`` must have the senders enrolled and be empty."""
    now = time.time()
    start = time.perf_counter()
    accepted = []
    for i in range(0, len(messages), batch):
        parsed = [verify.parse(topic, raw, 64 * 1024) for topic, raw in messages[i : i + batch]]
        fine = [p for p in parsed if isinstance(p, verify.Parsed)]
        records = store.keys(p.kid for p in fine)
        accepted += [verify.check(p, records.get(p.kid), now) for p in fine]
    checked = time.perf_counter() - start
    valid = [a for a in accepted if isinstance(a, Accepted)]
    if len(valid) != len(messages):
        raise RuntimeError(f"only {len(valid)} of {len(messages)} benchmark events passed the checks")
    server_key = PrivateKey(bytes(32))
    start = time.perf_counter()
    for i in range(0, len(valid), batch):
        result = store.commit(valid[i : i + batch], [], now)
        list(receipts.issue(result.watermarks, server_key, int(now * 1000)))
    committed = time.perf_counter() - start
    return {"check": len(messages) / checked, "commit": len(messages) / committed}
