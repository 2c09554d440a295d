"""The collector: MQTT v5 shared subscription -> verify -> store in batches -> acknowledge -> receipts.

The broker's acknowledgement (PUBACK) for each message is sent only after the batch holding it has
committed, so a collector that dies mid-batch leaves the broker to deliver those messages again.
paho's network thread only queues messages (a bounded queue: when full, it stops reading from the
socket, which pushes back on the broker); one worker thread verifies, commits, acknowledges and
sends receipts.
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
from server.store import SqliteStore
from server.verify import verify_message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "bt-collector-1"
    max_message_bytes: int = 64 * 1024
    batch_max: int = 500
    batch_ms: float = 50.0
    queue_max: int = 10_000
    session_expiry_s: int = 7 * 24 * 3600


class Collector:
    def __init__(self, settings: IntakeSettings, store: SqliteStore, server_key: PrivateKey) -> None:
        self.settings = settings
        self.store = store
        self.server_key = server_key
        self.queue: queue.Queue[mqtt.MQTTMessage] = queue.Queue(maxsize=settings.queue_max)
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

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the collector: %s", reason)
            return
        client.subscribe(topics.SHARED_EVENTS, qos=1)
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
                self.process(batch)

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

    def process(self, batch: list[mqtt.MQTTMessage]) -> None:
        now = time.time()
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        for message in batch:
            self.counters["received"] += 1
            outcome = verify_message(
                message.topic, bytes(message.payload), self.store.key, now, self.settings.max_message_bytes
            )
            if isinstance(outcome, Accepted):
                accepted.append(outcome)
            else:
                rejected.append(outcome)
                self.counters[f"rejected:{outcome.reason}"] += 1
                log.warning("rejected a message on %s: %s (%s)", outcome.topic, outcome.reason, outcome.detail)
        result = self.store.commit(accepted, rejected, now)
        self.counters["stored"] += result.stored
        self.counters["duplicates"] += result.duplicates
        for message in batch:  # only now: everything in the batch is durable
            self.client.ack(message.mid, message.qos)
        for topic, receipt in receipts.issue(result.watermarks, self.server_key, int(now * 1000)):
            self.client.publish(topic, receipt, qos=1)
            self.counters["receipts"] += 1
