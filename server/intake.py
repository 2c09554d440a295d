"""The collector: MQTT v5 shared subscription -> verify -> store in batches -> acknowledge -> receipts.

The broker's acknowledgement (PUBACK) for each message is sent only after the batch holding it has
committed, so a collector that dies mid-batch leaves the broker to deliver those messages again.

Three threads, so the work overlaps where the interpreter lock allows it:
  - the broker link's thread (server/broker_link.py) owns the socket and only queues what arrives,
    a socket read's worth at a time;
  - the calling thread takes batches in arrival order, checks them (server/verify.py) and commits
    them, then acknowledges and sends receipts. A batch is checked while the previous one commits;
  - a signature thread (server/signatures.py) runs the batch's Ed25519 checks meanwhile: they
    release the lock, the rest of checking does not, so one thread does all the Python work.
Arrival order matters for evidence: of two different events signed under one sequence number, the
first to arrive stays the record and the second is quarantined; batches are committed in the order
they were taken. The inbox stays near the MQTT v5 Receive Maximum announced to the broker: the link
stops reading while that many messages are unacknowledged, so the network thread never blocks on the
inbox (which would starve keep-alives). Events at QoS 0, which nothing acknowledges, are refused
before the inbox (counted as ``refused:qos0``), so that bound holds whatever devices publish.

When the store is unreachable, a batch is retried with backoff; nothing is acknowledged meanwhile,
so at Receive Maximum the link stops reading and the broker keeps the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from battery_trace.protocol import topics
from battery_trace.protocol.keys import PrivateKey, PublicKey
from battery_trace.protocol.text import escaped
from battery_trace.server import metrics, receipts
from battery_trace.server.broker_link import BrokerLink, LinkSettings
from battery_trace.server.mqtt_packets import Message
from battery_trace.server.records import Accepted, KeyRecord, Rejected
from battery_trace.server.signatures import SignatureChecker
from battery_trace.server.store import CommitResult, Store, StoreUnavailable
from battery_trace.server.verify import Parsed, bad_signature, parse, postcheck, precheck, signature_job

from battery_trace.tls import TlsFiles, client_context

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
    # Short on purpose: in a shared-subscription group the broker keeps handing an absent member its
    # share until the session expires. Nothing is lost when it does (agents resend until receipted),
    # but a long expiry would hold a retired collector's share back for that long.
    session_expiry_s: int = 300
    sweep_interval_s: float = 60.0
    tls: TlsFiles | None = None  # when set, the collector speaks only TLS to the broker


RECONNECT_MAX_S = 3


Arrival = tuple[int, Message]  # the connection it came on, and the message


def _device_of(topic: str) -> str:
    """The device level of a topic, for fairness only (verification checks the topic properly)."""
    parts = topic.split("/", 3)
    return parts[2] if len(parts) > 2 else topic


class Inbox:
    """Arrivals waiting to be checked: put a socket read's worth at once, take a batch at once, so
    the cost of locking and waking is per batch rather than per message. Kept per device, in each
    device's arrival order: when more wait than a batch holds, each device waiting gets its share of
    the batch first (round by round), so one device's flood delays only itself, while a device's own
    messages keep their order (which decides, for a fork, which event stays the record). Taking costs
    what is taken, not what is waiting."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[Arrival]] = {}  # per device; a dict keeps the devices' first arrival
        self._count = 0
        self._ready = threading.Condition()

    def put(self, items: list[Arrival]) -> None:
        keyed = [(_device_of(message.topic), (generation, message)) for generation, message in items]
        with self._ready:
            for device, item in keyed:
                queue = self._queues.get(device)
                if queue is None:
                    queue = self._queues[device] = deque()
                queue.append(item)
            self._count += len(keyed)
            self._ready.notify()

    def take(self, limit: int, wait_s: float, linger_s: float) -> list[Arrival]:
        """Up to ``limit`` arrivals: waits ``wait_s`` for a first one, then up to ``linger_s`` for more."""
        with self._ready:
            if not self._count and not self._ready.wait(wait_s):
                return []
            deadline = time.monotonic() + linger_s
            while self._count < limit and (remaining := deadline - time.monotonic()) > 0:
                self._ready.wait(remaining)
            taken: list[Arrival] = []
            while self._queues and len(taken) < limit:
                share = max(1, (limit - len(taken)) // len(self._queues))
                for device in list(self._queues):
                    queue = self._queues[device]
                    for _ in range(min(share, len(queue), limit - len(taken))):
                        taken.append(queue.popleft())
                    if not queue:
                        del self._queues[device]
                    else:  # served: to the back, so devices beyond this batch come first next time
                        self._queues[device] = self._queues.pop(device)
                    if len(taken) >= limit:
                        break
            self._count -= len(taken)
            return taken


@dataclass(frozen=True)
class Started:
    """A batch whose signatures are being checked on the signature thread."""

    batch: list[Arrival]
    received_at: float
    steps: list[Rejected | tuple[Parsed, KeyRecord]]  # refused before the signature, or what to finish
    signatures: Future[list[bool]]
    checking_s: float  # spent so far; the commit of the batch before runs between start and finish


@dataclass(frozen=True)
class Verified:
    batch: list[Arrival]
    accepted: list[Accepted]
    rejected: list[Rejected]
    received_at: float


class Collector:
    def __init__(
        self, settings: IntakeSettings, store: Store, server_key: PrivateKey, next_key: PublicKey | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.server_key = server_key
        self.next_key = next_key  # announced in every receipt while the server's key is being rotated
        self.inbox = Inbox()
        self.signatures = SignatureChecker()
        self.counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.store_ok = threading.Event()
        self.store_ok.set()
        self._last_sweep = 0.0
        self.failure: Exception | None = None  # an unexpected error that stopped the collector
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
        # An event at QoS 0 has no packet id: it cannot be held unacknowledged until it is stored, so
        # the Receive Maximum that bounds the inbox would not count it, and during a store outage the
        # inbox would grow without limit. Events are QoS 1 (docs/wire-contract.md): the rest is
        # refused here, counted, and never queued; an agent resends what is not receipted.
        acknowledgeable = [(generation, m) for m in messages if m.packet_id is not None]
        if refused := len(messages) - len(acknowledgeable):
            if not self.counters["refused:qos0"]:
                log.warning("refusing events published at QoS 0 (first on %s); events must be QoS 1", messages[0].topic)
            self.count("refused:qos0", refused)
            metrics.REFUSED_QOS0.inc(refused)
        if acknowledgeable:
            self.inbox.put(acknowledgeable)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        self.link.stop()

    # -- the pipeline -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Check and commit until ``stop`` is set; then commit what is already checked. An unexpected
        error stops the collector (``failure``): nothing unacknowledged is lost, the broker delivers it
        again to this collector's restart or to a peer."""
        self.signatures.start()
        try:
            self._pipeline(stop)
        except Exception as exc:
            log.exception("the intake failed; the collector stops")
            self.failure = exc
            stop.set()
        finally:
            self.signatures.stop()

    def _pipeline(self, stop: threading.Event) -> None:
        pending: Verified | None = None  # checked, waiting for its commit
        while True:
            # With a batch waiting to commit, take only what has already arrived: its commit (and the
            # acknowledgements and receipts behind it) must not wait for more traffic.
            wait, linger = (0.0, 0.0) if pending else (0.2, self.settings.batch_ms / 1000)
            batch = [] if stop.is_set() else self.inbox.take(self.settings.batch_max, wait, linger)
            started = self._start(batch, stop) if batch else None
            if batch and started is None:
                break  # stopped while the store was unreachable: nothing of it is acknowledged
            if pending is not None and not self.commit(pending, stop):
                break  # never acknowledged: the broker delivers these again
            pending = self._finish(started) if started else None
            if stop.is_set() and pending is None:
                break
            if time.monotonic() - self._last_sweep >= self.settings.sweep_interval_s:
                self._sweep()

    def _start(self, batch: list[Arrival], stop: threading.Event) -> Started | None:
        """Parse, find the keys, run the steps before the signature, hand the signatures over."""
        began = time.perf_counter()
        now = time.time()
        limit = self.settings.max_message_bytes
        parsed: list[Parsed | Rejected] = [parse(m.topic, m.payload, limit) for _, m in batch]
        kids = {p.kid for p in parsed if isinstance(p, Parsed)}
        records = self._retrying(lambda: self.store.keys(kids), stop)
        if records is None:
            return None
        steps: list[Rejected | tuple[Parsed, KeyRecord]] = []
        jobs = []
        for p in parsed:
            if isinstance(p, Rejected):
                steps.append(p)
                continue
            record = records.get(p.kid)
            refused = precheck(p, record, now)
            if refused is not None:
                steps.append(refused)
                continue
            assert record is not None  # precheck refuses an unknown key
            steps.append((p, record))
            jobs.append(signature_job(p, record))
        return Started(batch, now, steps, self.signatures.submit(jobs), time.perf_counter() - began)

    def _finish(self, started: Started) -> Verified:
        """The steps after the signature, run while the signatures are checked; then the outcomes."""
        began = time.perf_counter()
        after = [postcheck(*step) if isinstance(step, tuple) else step for step in started.steps]
        verdicts = iter(started.signatures.result())
        metrics.VERIFY.observe(started.checking_s + time.perf_counter() - began)
        accepted: list[Accepted] = []
        rejected: list[Rejected] = []
        for step, outcome in zip(started.steps, after, strict=True):
            if isinstance(step, tuple) and not next(verdicts):
                outcome = bad_signature(step[0])  # whatever the payload says, a forgery is only that
            if isinstance(outcome, Accepted):
                accepted.append(outcome)
                continue
            rejected.append(outcome)
            self.count(f"rejected:{outcome.reason}")
            metrics.REJECTED.labels(outcome.reason).inc()
            log.warning("rejected a message on %s: %s (%s)", escaped(outcome.topic), outcome.reason, outcome.detail)
        return Verified(started.batch, accepted, rejected, started.received_at)

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
        for refused in result.refused:
            self.count(f"rejected:{refused.reason}")
            metrics.REJECTED.labels(refused.reason).inc()
            log.warning("quarantined a message on %s: %s (%s)", escaped(refused.topic), refused.reason, refused.detail)
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
        now_ms = int(time.time() * 1000)
        for topic, receipt, kid in receipts.issue(result.watermarks, self.server_key, now_ms, self.next_key):
            self.link.publish(topic, receipt, about=kid)  # one pending per device key, not per device
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
            swept = self.store.sweep(time.time())
            self._last_sweep = time.monotonic()
            for reason, n in swept.dropped.items():
                metrics.QUARANTINE_DROPPED.labels(reason).inc(n)
        except StoreUnavailable as exc:
            log.warning("sweep postponed: %s", exc)
