"""The collector's MQTT v5 session: one thread that owns the socket, reconnecting for ever.

What it gives the collector:
  - every PUBLISH, handed over in the batches the socket delivered them in, tagged with the
    connection it came on (``generation``);
  - ``ack(generation, packet_ids)``: PUBACKs, sent only on the connection the messages came on. After
    a reconnect the broker delivers unacknowledged messages again, and the store drops the copies;
    acknowledging an old connection's packet id on a new one could acknowledge a different message;
  - ``publish(topic, payload)`` at QoS 1 for receipts. A receipt is a watermark, so a newer one for a
    device replaces an older one still waiting for the broker's send quota (its Receive Maximum), and
    receipts in flight when a connection drops are sent again on the next.

One thread does all socket I/O (an SSL connection must not be read and written from two threads);
other threads queue bytes and wake it through a socket pair, once per batch, not once per message.
Flow control: the broker should send no more than our Receive Maximum of unacknowledged messages,
but mosquitto 2.0.11 sends about twice as many new ones as were acknowledged (measured: 20
acknowledged, 41 sent), so the link does not rely on it: it stops reading the socket while that many are
unacknowledged, and TCP holds the rest back at the broker. Memory stays bounded by the Receive
Maximum plus one read, and the verifiers never wait on a full queue.

Packets larger than ``max_packet`` are announced as unwanted (Maximum Packet Size), so the broker
discards them instead of sending them; anything over the collector's own message limit but under
this one still arrives and is quarantined as ``too_large``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from battery_trace.server import mqtt_packets as mp

log = logging.getLogger(__name__)
_connections = itertools.count(1)  # numbers every connection of the process, so no two links share one
READ_BYTES = 1 << 16  # one read; what the link holds beyond the Receive Maximum is at most this


@dataclass(frozen=True)
class LinkSettings:
    host: str
    port: int
    client_id: str
    topic: str  # the one subscription, QoS 1
    session_expiry_s: int
    receive_maximum: int
    keepalive_s: int = 30
    max_packet: int = 1 << 20
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 3.0
    connect_timeout_s: float = 10.0


class Refused(ConnectionError):
    """The broker answered, and said no (CONNACK or SUBACK failure, or a DISCONNECT with a reason)."""


class BrokerLink:
    def __init__(
        self,
        settings: LinkSettings,
        on_messages: Callable[[int, list[mp.Message]], None],
        *,
        tls: ssl.SSLContext | None = None,
        on_subscribed: Callable[[], None] = lambda: None,
        on_disconnected: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.settings = settings
        self.tls = tls
        self.on_messages = on_messages
        self.on_subscribed = on_subscribed
        self.on_disconnected = on_disconnected
        self.generation = 0
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self._out = bytearray()  # acknowledgements and pings queued for the socket
        self._unsent = b""  # taken from the queue, not yet accepted by the socket
        # (topic, what it is about) -> newest receipt not yet sent: a newer receipt for the same device key
        # replaces an older one, while receipts for a device's other keys (a rotation's backlog) are kept.
        self._receipts: dict[tuple[str, bytes], bytes] = {}
        self._in_flight: dict[int, tuple[tuple[str, bytes], bytes]] = {}  # our QoS 1 PUBLISHes awaiting PUBACK
        self._unacked: set[int] = set()  # the broker's packet ids delivered to us, not yet acknowledged
        self._send_quota = 0
        self._next_id = 0
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread: threading.Thread | None = None

    # -- called from other threads ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.settings.client_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (unacknowledged messages stay with the broker) and end the thread."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def ack(self, generation: int, packet_ids: list[int]) -> int:
        """Acknowledge these messages; returns how many went out (none if their connection is gone)."""
        with self._lock:
            if generation != self.generation:
                return 0
            for packet_id in packet_ids:
                self._unacked.discard(packet_id)
            self._out += b"".join(map(mp.puback, packet_ids))
        self._wake()
        return len(packet_ids)

    def publish(self, topic: str, payload: bytes, about: bytes = b"") -> None:
        with self._lock:
            self._receipts[(topic, about)] = payload
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already awake (the pair is full), or shutting down
            self._wake_w.send(b"\x00")

    # -- the I/O thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.settings.reconnect_min_s
        while not self._stopping.is_set():
            started = time.monotonic()
            reason = "stopped"
            try:
                self._session()
            except Refused as exc:
                reason = str(exc)
                log.error("%s", exc)
            except (OSError, mp.PacketError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("broker connection lost (%s)", reason)
            except Exception as exc:  # a bug must not end the thread: a collector without it hangs
                reason = f"{type(exc).__name__}: {exc}"
                log.exception("unexpected error in the broker link; reconnecting")
            finally:
                self.subscribed.clear()
            if self._stopping.is_set():
                break
            self.on_disconnected(reason)
            if time.monotonic() - started > 10 * self.settings.reconnect_max_s:
                backoff = self.settings.reconnect_min_s  # a session that lasted starts the backoff over
            # Half to all of the backoff: collectors that lost the broker together do not return at once.
            self._stopping.wait(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, self.settings.reconnect_max_s)

    def _connect(self) -> tuple[socket.socket, mp.Splitter, mp.Connack, list[tuple[int, bytes]]]:
        """Connected, and what arrived right behind the CONNACK (a resumed session's messages)."""
        s = self.settings
        sock = socket.create_connection((s.host, s.port), timeout=s.connect_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=s.host)
            packet = mp.connect(
                s.client_id,
                keepalive=s.keepalive_s,
                clean_start=False,
                session_expiry=s.session_expiry_s,
                receive_maximum=s.receive_maximum,
                maximum_packet=s.max_packet,
            )
            sock.sendall(packet)
            splitter = mp.Splitter(s.max_packet)
            deadline = time.monotonic() + s.connect_timeout_s
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError("the broker closed the connection before CONNACK")
                packets = splitter.feed(data)
                if packets:
                    break
            first, body = packets[0]
            if first >> 4 != mp.CONNACK:
                raise mp.PacketError(f"expected CONNACK, got {mp.NAMES.get(first >> 4, first >> 4)}")
            connack = mp.decode_connack(body)
            if connack.reason >= 0x80:
                detail = f" ({connack.reason_string})" if connack.reason_string else ""
                raise Refused(f"the broker refused collector {s.client_id}: {mp.reason_text(connack.reason)}{detail}")
            return sock, splitter, connack, packets[1:]
        except BaseException:
            sock.close()
            raise

    def _session(self) -> None:
        sock, splitter, connack, early = self._connect()
        try:
            keepalive = connack.server_keepalive or self.settings.keepalive_s
            with self._lock:
                self.generation = next(_connections)
                self._unacked.clear()
                self._out.clear()  # acknowledgements for the old connection mean nothing on this one
                for slot, payload in self._in_flight.values():  # sent again; a newer receipt still wins
                    self._receipts.setdefault(slot, payload)
                self._in_flight.clear()
                self._send_quota = max(1, connack.receive_maximum)
                subscribe_id = self._packet_id()
                self._out += mp.subscribe(subscribe_id, self.settings.topic, qos=1)
            self._handle(early, subscribe_id)
            sock.setblocking(False)
            self._loop(sock, splitter, keepalive, subscribe_id)
        finally:
            try:
                if self._stopping.is_set():  # what is acknowledged by now must reach the broker first
                    sock.settimeout(2.0)
                    sock.sendall(self._unsent + self._take_output() + mp.DISCONNECT_PACKET)
            except OSError:
                pass
            self._unsent = b""
            sock.close()

    def _packet_id(self) -> int:
        """The next packet id not in flight (caller holds the lock)."""
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._in_flight:
                return self._next_id
        raise RuntimeError("all 65,535 packet ids are in flight")  # the send quota makes this unreachable

    def _take_output(self) -> bytes:
        with self._lock:
            while self._receipts and self._send_quota > 0:
                slot = next(iter(self._receipts))
                payload = self._receipts.pop(slot)
                packet_id = self._packet_id()
                self._in_flight[packet_id] = (slot, payload)
                self._send_quota -= 1
                self._out += mp.publish(slot[0], payload, packet_id)
            out = bytes(self._out)
            self._out.clear()
        return out

    def _loop(self, sock: socket.socket, splitter: mp.Splitter, keepalive: int, subscribe_id: int) -> None:
        last_in = last_out = time.monotonic()
        while not self._stopping.is_set():
            self._unsent += self._take_output()
            now = time.monotonic()
            if keepalive and now - last_out >= keepalive / 2 and not self._unsent:
                self._unsent = mp.PINGREQ_PACKET
            reading = len(self._unacked) < self.settings.receive_maximum
            if not reading:
                last_in = now  # not reading is our choice, not the broker's silence
            elif keepalive and now - last_in > keepalive * 1.5:
                raise TimeoutError(f"nothing from the broker for {now - last_in:.0f} s (keep-alive {keepalive} s)")
            # Decrypted bytes already inside an SSL connection do not make its socket readable.
            buffered = reading and isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            readable, writable, _ = select.select(
                [sock, self._wake_r] if reading else [self._wake_r],
                [sock] if self._unsent else [],
                [],
                0 if buffered else (keepalive / 4 if keepalive else 1.0),
            )
            if buffered:
                readable.append(sock)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
            if writable and self._unsent:
                try:
                    sent = sock.send(self._unsent)
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    sent = 0
                self._unsent = self._unsent[sent:]
                if sent:
                    last_out = time.monotonic()
            if sock in readable:
                data = self._read(sock)
                if data:
                    last_in = time.monotonic()
                    self._handle(splitter.feed(data), subscribe_id)

    def _read(self, sock: socket.socket) -> bytes:
        try:
            data = sock.recv(READ_BYTES)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return b""
        if not data:
            raise ConnectionError("the broker closed the connection")
        return data

    def _handle(self, packets: list[tuple[int, bytes]], subscribe_id: int) -> None:
        messages = []
        for first, body in packets:
            kind = first >> 4
            if kind == mp.PUBLISH:
                message = mp.decode_publish(first, body)
                if message.packet_id is not None:
                    with self._lock:
                        self._unacked.add(message.packet_id)
                messages.append(message)
            elif kind == mp.PUBACK:
                packet_id, (reason,) = mp.decode_ack("PUBACK", body)
                with self._lock:
                    sent = self._in_flight.pop(packet_id, None)
                    if sent is not None:
                        self._send_quota += 1
                if reason >= 0x80 and sent is not None:
                    log.warning("the broker refused a receipt on %s: %s", sent[0][0], mp.reason_text(reason))
            elif kind == mp.SUBACK:
                packet_id, reasons = mp.decode_ack("SUBACK", body)
                failed = [r for r in reasons if r >= 0x80]
                if packet_id == subscribe_id and failed:
                    raise Refused(
                        f"the broker refused the subscription to {self.settings.topic}: {mp.reason_text(failed[0])}"
                    )
                if packet_id == subscribe_id:
                    self.subscribed.set()
                    self.on_subscribed()
            elif kind == mp.PINGRESP:
                pass
            elif kind == mp.DISCONNECT:
                reason, text = mp.decode_disconnect(body)
                raise Refused(f"the broker disconnected us: {mp.reason_text(reason)}{f' ({text})' if text else ''}")
            else:
                raise mp.PacketError(f"a {mp.NAMES.get(kind, kind)} packet was not expected from the broker")
        if messages:
            self.on_messages(self.generation, messages)
