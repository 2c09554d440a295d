"""The collector: MQTT v5 shared subscription -> verify -> store in batches -> acknowledge -> receipts.

The broker's acknowledgement (PUBACK) for each message is sent only after the batch holding it has
committed, so a collector that dies mid-batch leaves the broker to deliver those messages again.

Three kinds of threads, so the work overlaps:
  - the broker link's thread (server/broker_link.py) owns the socket and only queues what arrives,
    a socket read's worth at a time;
  - verifier threads (``verify_threads``) take batches and check them; Ed25519 verification
    releases the GIL, so one verifier's signatures overlap another's Python work;
  - the calling thread commits verified batches in the order they arrived (not the order their
    verification finished), then acknowledges and sends receipts; database I/O releases the GIL too.
Arrival order matters for evidence: of two different events signed under one sequence number, the
first to arrive stays the record and the second is quarantined, whichever verifier was quicker.
The inbox's bound is the MQTT v5 Receive Maximum announced to the broker: the broker never has more
unacknowledged messages out to this collector than that (the link disconnects a broker that tries),
so the network thread never blocks on it (which would starve keep-alives).

When the store is unreachable, a batch is retried with backoff; nothing is acknowledged meanwhile,
so the broker stops sending at Receive Maximum and keeps the rest.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from protocol import topics
from protocol.keys import PrivateKey
from protocol.tls import TlsFiles, client_context
from server import metrics, receipts
from server.broker_link import BrokerLink, LinkSettings
from server.mqtt_packets import Message
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


Arrival = tuple[int, Message]  # the connection it came on, and the message


class Inbox:
    """Arrivals waiting for a verifier: put a socket read's worth at once, take a batch at once, so
    the cost of locking and waking is per batch rather than per message."""

    def __init__(self) -> None:
        self._items: deque[Arrival] = deque()
        self._ready = threading.Condition()

    def put(self, items: list[Arrival]) -> None:
        with self._ready:
            self._items.extend(items)
            self._ready.notify()

    def take(self, limit: int, wait_s: float, linger_s: float) -> list[Arrival]:
        """Up to ``limit`` arrivals: waits ``wait_s`` for a first one, then up to ``linger_s`` for more."""
        items = self._items
        with self._ready:
            if not items and not self._ready.wait(wait_s):
                return []
            deadline = time.monotonic() + linger_s
            while len(items) < limit and (remaining := deadline - time.monotonic()) > 0:
                self._ready.wait(remaining)
            return [items.popleft() for _ in range(min(limit, len(items)))]

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Verified:
    ticket: int  # the batch's place in arrival order
    batch: list[Arrival]
    accepted: list[Accepted]
    rejected: list[Rejected]
    received_at: float


class Collector:
    def __init__(self, settings: IntakeSettings, store: Store, server_key: PrivateKey) -> None:
        self.settings = settings
        self.store = store
        self.server_key = server_key
        self.inbox = Inbox()
        self.verified: queue.Queue[Verified] = queue.Queue(maxsize=settings.verify_threads)
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.store_ok = threading.Event()
        self.store_ok.set()
        self._last_sweep = 0.0
        self.failure: Exception | None = None  # an unexpected error that stopped the collector
        self._taking = threading.Lock()  # one verifier fills a batch at a time: batches are runs of arrivals
        self._tickets = itertools.count()
        self.link = BrokerLink(
            LinkSettings(
                host=settings.host,
                port=settings.port,
                client_id=settings.client_id,
                topic=topics.SHARED_EVENTS,
                session_expiry_s=settings.session_expiry_s,
                receive_maximum=settings.receive_max,
                # Over the collector's limit but under this, a message still arrives and is quarantined
                # as too_large; beyond it the broker discards it (set mosquitto's message_size_limit).
                max_packet=max(16 * settings.max_message_bytes, 1 << 20),
                reconnect_max_s=RECONNECT_MAX_S,
            ),
            self._on_messages,
            tls=client_context(settings.tls) if settings.tls else None,
            on_subscribed=self._on_subscribed,
            on_disconnected=self._on_disconnected,
        )
        self.connected = self.link.subscribed

    def count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    # -- MQTT (the link's thread) -----------------------------------------------------------------

    def _on_subscribed(self) -> None:
        metrics.BROKER_UP.set(1)
        log.info("collector %s subscribed to %s", self.settings.client_id, topics.SHARED_EVENTS)

    def _on_disconnected(self, reason: str) -> None:
        metrics.BROKER_UP.set(0)
        self.count("disconnects")

    def _on_messages(self, generation: int, messages: list[Message]) -> None:
        self.inbox.put([(generation, m) for m in messages])

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

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

    def _take_batch(self) -> tuple[int, list[Arrival]]:
        """The next run of arrivals (up to ``batch_max``, waiting at most ``batch_ms``) and its ticket."""
        with self._taking:
            batch = self.inbox.take(self.settings.batch_max, 0.2, self.settings.batch_ms / 1000)
            return (next(self._tickets), batch) if batch else (-1, batch)

    def verify(self, batch: list[Arrival], now: float) -> tuple[list[Accepted], list[Rejected]]:
        with metrics.VERIFY.time():
            return self._verify(batch, now)

    def _verify(self, batch: list[Arrival], now: float) -> tuple[list[Accepted], list[Rejected]]:
        limit = self.settings.max_message_bytes
        parsed: list[Parsed | Rejected] = [parse(m.topic, m.payload, limit) for _, m in batch]
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
        by_connection: dict[int, list[int]] = {}
        for generation, message in item.batch:  # only now: everything in the batch is durable
            if message.packet_id is not None:
                by_connection.setdefault(generation, []).append(message.packet_id)
        for generation, packet_ids in by_connection.items():
            self.link.ack(generation, packet_ids)
        for topic, receipt in receipts.issue(result.watermarks, self.server_key, int(time.time() * 1000)):
            self.link.publish(topic, receipt)
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
