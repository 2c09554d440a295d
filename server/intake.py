"""The collector: MQTT v5 shared subscription -> verify -> store in batches -> acknowledge -> receipts.

The broker's acknowledgement (PUBACK) for each message is sent only after the batch holding it has
committed, so a collector that dies mid-batch leaves the broker to deliver those messages again.
paho's network thread only queues messages; one worker thread verifies, commits, acknowledges and
sends receipts. The queue's bound is the MQTT v5 Receive Maximum announced to the broker: the broker
never has more unacknowledged messages out to this collector than that, so the queue can never
overflow and the network thread never blocks (which would starve keep-alives).

When the store is unreachable, the batch is retried with backoff; nothing is acknowledged meanwhile,
so the broker stops sending at Receive Maximum and keeps the rest.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol import topics
from protocol.keys import PrivateKey
from server import receipts
from server.records import Accepted, Rejected
from server.store import Store, StoreUnavailable
from server.verify import Parsed, check, parse

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "bt-collector-1"
    max_message_bytes: int = 64 * 1024
    batch_max: int = 500
    batch_ms: float = 50.0
    receive_max: int = 2000
    session_expiry_s: int = 7 * 24 * 3600
    sweep_interval_s: float = 60.0


class Collector:
    def __init__(self, settings: IntakeSettings, store: Store, server_key: PrivateKey) -> None:
        self.settings = settings
        self.store = store
        self.server_key = server_key
        self.queue: queue.Queue[mqtt.MQTTMessage] = queue.Queue(maxsize=settings.receive_max * 2)
        self.store_ok = threading.Event()
        self.store_ok.set()
        self._last_sweep = 0.0
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the collector: %s", reason)
            return
        client.subscribe(topics.SHARED_EVENTS, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, reasons: list, props: object) -> None:
        if any(getattr(r, "is_failure", False) for r in reasons):
            log.error("the broker refused the subscription to %s: %s", topics.SHARED_EVENTS, reasons)
            return
        self.connected.set()
        log.info("collector %s subscribed to %s", self.settings.client_id, topics.SHARED_EVENTS)

    def _on_disconnect(self, client: mqtt.Client, *args: object) -> None:
        self.connected.clear()
        self.counters["disconnects"] += 1

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.queue.put(message)

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.ReceiveMaximum = self.settings.receive_max
        self.client.connect_async(
            self.settings.host, self.settings.port, keepalive=30, clean_start=False, properties=props
        )
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def run(self, stop: threading.Event) -> None:
        """Process batches until ``stop`` is set."""
        while not stop.is_set():
            batch = self._take_batch()
            if batch:
                self.process(batch, stop)
            if time.monotonic() - self._last_sweep >= self.settings.sweep_interval_s:
                self._sweep()

    def _sweep(self) -> None:
        try:
            self.store.sweep(time.time())
            self._last_sweep = time.monotonic()
        except StoreUnavailable as exc:
            log.warning("sweep postponed: %s", exc)

    def _take_batch(self) -> list[mqtt.MQTTMessage]:
        try:
            first = self.queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.batch_ms / 1000
        while len(batch) < self.settings.batch_max:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self.queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def verify(self, batch: list[mqtt.MQTTMessage], now: float) -> tuple[list[Accepted], list[Rejected]]:
        parsed: list[Parsed | Rejected] = [
            parse(m.topic, bytes(m.payload), self.settings.max_message_bytes) for m in batch
        ]
        records = self.store.keys(p.kid for p in parsed if isinstance(p, Parsed))
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        for p in parsed:
            outcome = check(p, records.get(p.kid), now) if isinstance(p, Parsed) else p
            if isinstance(outcome, Accepted):
                accepted.append(outcome)
            else:
                rejected.append(outcome)
                self.counters[f"rejected:{outcome.reason}"] += 1
                log.warning("rejected a message on %s: %s (%s)", outcome.topic, outcome.reason, outcome.detail)
        return accepted, rejected

    def process(self, batch: list[mqtt.MQTTMessage], stop: threading.Event | None = None) -> bool:
        """Verify, commit, then acknowledge and send receipts. False when stopped before it could commit."""
        backoff = 0.2
        while True:
            now = time.time()
            try:
                accepted, rejected = self.verify(batch, now)
                result = self.store.commit(accepted, rejected, now)
                break
            except StoreUnavailable as exc:
                if self.store_ok.is_set():
                    log.error("store unavailable, holding %d messages unacknowledged: %s", len(batch), exc)
                self.store_ok.clear()
                self.counters["store_failures"] += 1
                if stop is not None and stop.wait(backoff):
                    return False  # never acknowledged: the broker delivers them again
                backoff = min(backoff * 2, 5.0)
        if not self.store_ok.is_set():
            log.info("store reachable again")
            self.store_ok.set()
        self.counters["received"] += len(batch)
        self.counters["stored"] += result.stored
        self.counters["duplicates"] += result.duplicates
        self.counters["findings"] += result.findings
        for message in batch:  # only now: everything in the batch is durable
            self.client.ack(message.mid, message.qos)
        for topic, receipt in receipts.issue(result.watermarks, self.server_key, int(now * 1000)):
            self.client.publish(topic, receipt, qos=1)
            self.counters["receipts"] += 1
        return True
