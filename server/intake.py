"""The collector: MQTT v5 shared subscription -> verify -> store in batches -> acknowledge -> receipts.

The broker's acknowledgement (PUBACK) for each message is sent only after the batch holding it has
committed, so a collector that dies mid-batch leaves the broker to deliver those messages again.

Three kinds of threads, so the work overlaps:
  - paho's network thread only queues what arrives;
  - verifier threads (``verify_threads``) take batches and check them; Ed25519 verification
    releases the GIL, so one verifier's signatures overlap another's Python work;
  - the calling thread commits verified batches in the order they arrived (not the order their
    verification finished), then acknowledges and sends receipts; database I/O releases the GIL too.
Arrival order matters for evidence: of two different events signed under one sequence number, the
first to arrive stays the record and the second is quarantined, whichever verifier was quicker.
The queue's bound is the MQTT v5 Receive Maximum announced to the broker: the broker never has more
unacknowledged messages out to this collector than that, so the queue cannot overflow and the
network thread never blocks (which would starve keep-alives).

When the store is unreachable, a batch is retried with backoff; nothing is acknowledged meanwhile,
so the broker stops sending at Receive Maximum and keeps the rest.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol import topics
from protocol.keys import PrivateKey
from protocol.tls import TlsFiles, client_context
from server import metrics, receipts
from server.records import Accepted, Rejected
from server.store import CommitResult, Store, StoreUnavailable
from server.verify import Parsed, check, parse

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class IntakeSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "bt-collector-1"
    max_message_bytes: int = 64 * 1024
    batch_max: int = 500
    batch_ms: float = 50.0
    receive_max: int = 2000
    verify_threads: int = 2
    # Short on purpose: in a shared-subscription group the broker keeps handing an absent member its
    # share until the session expires. Nothing is lost when it does (agents resend until receipted),
    # but a long expiry would hold a retired collector's share back for that long.
    session_expiry_s: int = 300
    sweep_interval_s: float = 60.0
    tls: TlsFiles | None = None  # when set, the collector speaks only TLS to the broker


RECONNECT_MAX_S = 3


@dataclass(frozen=True)
class Verified:
    ticket: int  # the batch's place in arrival order
    batch: list[mqtt.MQTTMessage]
    accepted: list[Accepted]
    rejected: list[Rejected]
    received_at: float


class Collector:
    def __init__(self, settings: IntakeSettings, store: Store, server_key: PrivateKey) -> None:
        self.settings = settings
        self.store = store
        self.server_key = server_key
        self.queue: queue.Queue[mqtt.MQTTMessage] = queue.Queue(maxsize=settings.receive_max * 2)
        self.verified: queue.Queue[Verified] = queue.Queue(maxsize=settings.verify_threads)
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.connected = threading.Event()
        self.store_ok = threading.Event()
        self.store_ok.set()
        self._last_sweep = 0.0
        self.failure: Exception | None = None  # an unexpected error that stopped the collector
        self._taking = threading.Lock()  # one verifier fills a batch at a time: batches are runs of arrivals
        self._tickets = itertools.count()
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
        if settings.tls:
            self.client.tls_set_context(client_context(settings.tls))
        # paho backs off up to 2 minutes by default; a collector is the broker's neighbour and every
        # second it is away the agents' backlogs grow, so it comes back within seconds.
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=RECONNECT_MAX_S)

    def count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    # -- MQTT (paho's network thread) -------------------------------------------------------------

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
        metrics.BROKER_UP.set(1)
        log.info("collector %s subscribed to %s", self.settings.client_id, topics.SHARED_EVENTS)

    def _on_disconnect(self, client: mqtt.Client, *args: object) -> None:
        self.connected.clear()
        metrics.BROKER_UP.set(0)
        self.count("disconnects")

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

    # -- the pipeline -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Verify and commit until ``stop`` is set; then commit what is already verified."""
        verifiers = [
            threading.Thread(target=self._verify_loop, args=(stop,), name=f"verify-{i}", daemon=True)
            for i in range(self.settings.verify_threads)
        ]
        for t in verifiers:
            t.start()
        waiting: dict[int, Verified] = {}  # verified out of turn; at most one per verifier
        turn = 0
        while True:
            try:
                item: Verified | None = self.verified.get(timeout=0.2)
            except queue.Empty:
                item = None
            while item is not None:  # whatever else is verified already goes into the same transaction
                waiting[item.ticket] = item
                item = self.verified.get_nowait() if not self.verified.empty() else None
            items = []
            while turn in waiting:
                items.append(waiting.pop(turn))
                turn += 1
            if items and not self.commit(_merge(items), stop):
                break
            if stop.is_set() and not items and self.verified.empty():
                break  # what is not committed is not acknowledged: the broker delivers it again
            if time.monotonic() - self._last_sweep >= self.settings.sweep_interval_s:
                self._sweep()
        for t in verifiers:
            t.join(timeout=5)

    def _verify_loop(self, stop: threading.Event) -> None:
        try:
            self._verify_batches(stop)
        except Exception as exc:
            # A lost ticket would hold back every later batch: stop the whole collector instead. Nothing
            # unacknowledged is lost; the broker delivers it again to this collector's restart or a peer.
            log.exception("a verifier failed; the collector stops")
            self.failure = exc
            stop.set()

    def _verify_batches(self, stop: threading.Event) -> None:
        while not stop.is_set():
            ticket, batch = self._take_batch()
            if not batch:
                continue
            now = time.time()
            outcome = self._retrying(lambda b=batch, n=now: self.verify(b, n), stop)
            if outcome is None:
                return
            item = Verified(ticket, batch, *outcome, now)
            while not stop.is_set():
                try:
                    self.verified.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue

    def _take_batch(self) -> tuple[int, list[mqtt.MQTTMessage]]:
        """The next run of arrivals (up to ``batch_max``, waiting at most ``batch_ms``) and its ticket."""
        with self._taking:
            batch = self._fill()
            return (next(self._tickets), batch) if batch else (-1, batch)

    def _fill(self) -> list[mqtt.MQTTMessage]:
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
        with metrics.VERIFY.time():
            return self._verify(batch, now)

    def _verify(self, batch: list[mqtt.MQTTMessage], now: float) -> tuple[list[Accepted], list[Rejected]]:
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
                self.count(f"rejected:{outcome.reason}")
                metrics.REJECTED.labels(outcome.reason).inc()
                log.warning("rejected a message on %s: %s (%s)", outcome.topic, outcome.reason, outcome.detail)
        return accepted, rejected

    def commit(self, item: Verified, stop: threading.Event | None = None) -> bool:
        """Commit, then acknowledge and send receipts. False when stopped before it could commit."""

        def commit() -> CommitResult:
            with metrics.COMMIT.time():
                return self.store.commit(item.accepted, item.rejected, item.received_at)

        result: CommitResult | None = self._retrying(commit, stop)
        if result is None:
            return False  # never acknowledged: the broker delivers these again
        self.count("received", len(item.batch))
        self.count("stored", result.stored)
        self.count("duplicates", result.duplicates)
        self.count("findings", result.findings)
        metrics.BATCH.observe(len(item.batch))
        metrics.MESSAGES.labels("accepted").inc(result.stored)
        metrics.MESSAGES.labels("duplicate").inc(result.duplicates)
        metrics.MESSAGES.labels("rejected").inc(result.quarantined)
        metrics.FINDINGS.inc(result.findings)
        for message in item.batch:  # only now: everything in the batch is durable
            self.client.ack(message.mid, message.qos)
        for topic, receipt in receipts.issue(result.watermarks, self.server_key, int(time.time() * 1000)):
            self.client.publish(topic, receipt, qos=1)
            self.count("receipts")
            metrics.RECEIPTS.inc()
        return True

    def _retrying(self, work: Callable[[], T], stop: threading.Event | None) -> T | None:
        """``work()``, retried with backoff while the store is unavailable; None if stopped meanwhile."""
        backoff = 0.2
        while True:
            try:
                result = work()
            except StoreUnavailable as exc:
                if self.store_ok.is_set():
                    log.error("store unavailable, holding messages unacknowledged: %s", exc)
                self.store_ok.clear()
                self.count("store_failures")
                metrics.STORE_FAILURES.inc()
                if stop is not None and stop.wait(backoff):
                    return None
                backoff = min(backoff * 2, 5.0)
                continue
            if not self.store_ok.is_set():
                log.info("store reachable again")
                self.store_ok.set()
            return result

    def _sweep(self) -> None:
        try:
            self.store.sweep(time.time())
            self._last_sweep = time.monotonic()
        except StoreUnavailable as exc:
            log.warning("sweep postponed: %s", exc)


def _merge(items: list[Verified]) -> Verified:
    """Verified batches committed as one: a commit has a fixed cost, so a backlog shares it."""
    if len(items) == 1:
        return items[0]
    return Verified(
        items[0].ticket,
        [m for i in items for m in i.batch],
        [a for i in items for a in i.accepted],
        [r for i in items for r in i.rejected],
        items[-1].received_at,
    )
