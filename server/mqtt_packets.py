"""MQTT v5 packets, as much of the protocol as a collector speaks: pure encoders and decoders.

Why not paho here: on the collector's hot path paho builds a ``Properties`` object, a ``Condition``
and a message-info object for every PUBLISH, and wakes its network thread for every PUBACK; measured
under the GIL that cost more than the signature check (docs/performance.md). A collector needs a
small, fixed part of MQTT v5 (OASIS mqtt-v5.0, §3): CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH and
PUBACK both ways, PINGREQ/PINGRESP and DISCONNECT. Everything else from the broker is a protocol
error, and every decoding error names the packet, the byte and what was expected.

The broker is trusted less than it might be: lengths are checked against the bytes present, the
variable-byte integers are bounded, and a packet larger than ``max_packet`` is refused before it is
buffered whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14
NAMES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "AUTH",
}
MAX_REMAINING = 268_435_455  # the largest remaining length four variable-byte digits can say (§1.5.5)

# Property identifiers (§2.2.2.2) the collector reads or writes, and the wire type of every one, so
# that properties it does not use are skipped correctly rather than misread.
SESSION_EXPIRY, RECEIVE_MAXIMUM, MAXIMUM_PACKET, REASON_STRING, SERVER_KEEP_ALIVE = 0x11, 0x21, 0x27, 0x1F, 0x13
_BYTE, _TWO, _FOUR, _VARINT, _TEXT, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE,
    0x02: _FOUR,
    0x03: _TEXT,
    0x08: _TEXT,
    0x09: _BINARY,
    0x0B: _VARINT,
    0x11: _FOUR,
    0x12: _TEXT,
    0x13: _TWO,
    0x15: _TEXT,
    0x16: _BINARY,
    0x17: _BYTE,
    0x18: _FOUR,
    0x19: _BYTE,
    0x1A: _TEXT,
    0x1C: _TEXT,
    0x1F: _TEXT,
    0x21: _TWO,
    0x22: _TWO,
    0x23: _TWO,
    0x24: _BYTE,
    0x25: _BYTE,
    0x26: _PAIR,
    0x27: _FOUR,
    0x28: _BYTE,
    0x29: _BYTE,
    0x2A: _BYTE,
}


class PacketError(ValueError):
    """Bytes from the broker that are not the MQTT v5 this client speaks."""


# -- encoding ---------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"{n} does not fit a variable-byte integer (0..{MAX_REMAINING})")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if len(raw) > 0xFFFF:
        raise ValueError(f"a string of {len(raw)} bytes is longer than MQTT allows (65,535)")
    return struct.pack(">H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect(
    client_id: str,
    *,
    keepalive: int,
    clean_start: bool,
    session_expiry: int,
    receive_maximum: int,
    maximum_packet: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0) | (0x40 if password else 0)
    props = bytes([SESSION_EXPIRY]) + struct.pack(">I", session_expiry)
    props += bytes([RECEIVE_MAXIMUM]) + struct.pack(">H", receive_maximum)
    props += bytes([MAXIMUM_PACKET]) + struct.pack(">I", maximum_packet)
    body = _text("MQTT") + bytes([5, flags]) + struct.pack(">H", keepalive) + varint(len(props)) + props
    body += _text(client_id)
    if username is not None:
        body += _text(username)
    if password:
        body += _text(password)
    return _packet(CONNECT << 4, body)


def subscribe(packet_id: int, topic: str, qos: int) -> bytes:
    # Options byte: QoS, and "no local" off; a shared subscription may not set it (§3.8.3.1).
    return _packet(SUBSCRIBE << 4 | 0x02, struct.pack(">H", packet_id) + b"\x00" + _text(topic) + bytes([qos]))


def publish(topic: str, payload: bytes, packet_id: int) -> bytes:
    """A QoS 1 PUBLISH without properties. Never a DUP: after a reconnect the link sends a receipt
    again as a new message (receipts are idempotent watermarks)."""
    return _packet(PUBLISH << 4 | 0x02, _text(topic) + struct.pack(">H", packet_id) + b"\x00" + payload)


def puback(packet_id: int) -> bytes:
    """Success, in the short form §3.4.2.1 allows (reason code and properties omitted)."""
    return b"\x40\x02" + struct.pack(">H", packet_id)


PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # normal disconnection (reason 0x00)


# -- decoding ---------------------------------------------------------------------------------------


@dataclass
class Splitter:
    """Cuts a byte stream into packets. ``feed`` takes what the socket gave; returns whole packets as
    (first byte, body). Stream framing comes only from the remaining-length field, never from reads."""

    max_packet: int
    _buffer: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buffer
        buf += data
        packets = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            length, shift, i, complete = 0, 0, pos + 1, False
            while i < end:
                digit = buf[i]
                i += 1
                length |= (digit & 0x7F) << shift
                if not digit & 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise PacketError(f"remaining length at stream byte {pos + 1} is longer than four bytes")
            if not complete:
                break  # the length itself has not fully arrived
            if length > self.max_packet:
                name = NAMES.get(buf[pos] >> 4, f"type {buf[pos] >> 4}")
                raise PacketError(f"{name} of {length:,} bytes is over this client's limit of {self.max_packet:,}")
            if i + length > end:
                break
            packets.append((buf[pos], bytes(buf[i : i + length])))
            pos = i + length
        del buf[:pos]
        return packets

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class _Reader:
    def __init__(self, name: str, body: bytes) -> None:
        self.name = name
        self.body = body
        self.pos = 0

    def fail(self, what: str) -> PacketError:
        return PacketError(f"{self.name}: {what} at byte {self.pos} of {len(self.body)}")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.body):
            raise self.fail(f"needs {n} more bytes, {len(self.body) - self.pos} left")
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def two(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            digit = self.byte()
            value |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return value
            shift += 7
        raise self.fail("variable-byte integer longer than four bytes")

    def text(self) -> str:
        raw = self.take(self.two())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("string is not UTF-8") from None

    def properties(self) -> dict[int, object]:
        length = self.varint()
        end = self.pos + length
        if end > len(self.body):
            raise self.fail(f"properties of {length} bytes run past the packet")
        found: dict[int, object] = {}
        while self.pos < end:
            ident = self.varint()
            kind = _PROPERTY_TYPES.get(ident)
            if kind is None:
                raise self.fail(f"unknown property identifier 0x{ident:02x}")
            value: object
            if kind == _BYTE:
                value = self.byte()
            elif kind == _TWO:
                value = self.two()
            elif kind == _FOUR:
                value = int.from_bytes(self.take(4), "big")
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _TEXT:
                value = self.text()
            elif kind == _BINARY:
                value = self.take(self.two())
            else:
                value = (self.text(), self.text())
            found[ident] = value
        if self.pos != end:
            raise self.fail("a property runs past the property length")
        return found

    def done(self) -> None:
        if self.pos != len(self.body):
            raise self.fail(f"{len(self.body) - self.pos} unexpected trailing bytes")


@dataclass(frozen=True)
class Message:
    """One PUBLISH from the broker. ``packet_id`` is None at QoS 0 (nothing to acknowledge)."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    dup: bool = False


def decode_publish(first: int, body: bytes) -> Message:
    flags = first & 0x0F
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise PacketError("PUBLISH: QoS 3 does not exist")
    if qos == 2:
        raise PacketError("PUBLISH: QoS 2 was never subscribed to")
    # The hot path: topic, packet id, and properties skipped by their length (nothing in them is used;
    # topic aliases are never announced, so the broker may not use them).
    if len(body) < 2:
        raise PacketError("PUBLISH: no topic length")
    topic_end = 2 + (body[0] << 8 | body[1])
    pos = topic_end + (2 if qos else 0)
    if pos >= len(body):
        raise PacketError(f"PUBLISH: the topic and packet id need {pos + 1} bytes, the packet has {len(body)}")
    try:
        topic = body[2:topic_end].decode("utf-8")
    except UnicodeDecodeError:
        raise PacketError("PUBLISH: topic is not UTF-8") from None
    packet_id = (body[topic_end] << 8 | body[topic_end + 1]) if qos else None
    if packet_id == 0:
        raise PacketError("PUBLISH: packet id 0 is not allowed at QoS 1")
    if body[pos] < 0x80:  # one-byte property length: nearly always 0
        props_end = pos + 1 + body[pos]
    else:
        reader = _Reader("PUBLISH", body)
        reader.pos = pos
        length = reader.varint()
        props_end = reader.pos + length
    if props_end > len(body):
        raise PacketError("PUBLISH: properties run past the packet")
    return Message(topic, body[props_end:], qos, packet_id, bool(flags & 0x08))


@dataclass(frozen=True)
class Connack:
    session_present: bool
    reason: int
    receive_maximum: int  # how many of our QoS 1 PUBLISHes the broker takes unacknowledged
    server_keepalive: int | None
    reason_string: str | None


def decode_connack(body: bytes) -> Connack:
    r = _Reader("CONNACK", body)
    flags = r.byte()
    reason = r.byte()
    props = r.properties()
    r.done()
    return Connack(
        bool(flags & 1),
        reason,
        int(props.get(RECEIVE_MAXIMUM, 65535)),  # type: ignore[call-overload]
        props.get(SERVER_KEEP_ALIVE),  # type: ignore[arg-type]
        props.get(REASON_STRING),  # type: ignore[arg-type]
    )


def decode_ack(name: str, body: bytes) -> tuple[int, list[int]]:
    """PUBACK or SUBACK: the packet id and the reason code(s) (PUBACK's may be omitted: success)."""
    r = _Reader(name, body)
    packet_id = r.two()
    if name == "PUBACK":
        reason = r.byte() if r.pos < len(body) else 0
        if r.pos < len(body):
            r.properties()
        r.done()
        return packet_id, [reason]
    r.properties()
    reasons = list(body[r.pos :])
    if not reasons:
        raise r.fail("no reason codes")
    return packet_id, reasons


def decode_disconnect(body: bytes) -> tuple[int, str | None]:
    if not body:
        return 0, None
    r = _Reader("DISCONNECT", body)
    reason = r.byte()
    props = r.properties() if r.pos < len(body) else {}
    r.done()
    return reason, props.get(REASON_STRING)  # type: ignore[return-value]


REASONS = {
    0x00: "normal disconnection",
    0x80: "unspecified error",
    0x81: "malformed packet",
    0x82: "protocol error",
    0x83: "implementation specific error",
    0x84: "unsupported protocol version",
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x88: "server unavailable",
    0x89: "server busy",
    0x8A: "banned",
    0x8B: "server shutting down",
    0x8C: "bad authentication method",
    0x8D: "keep alive timeout",
    0x8E: "session taken over",
    0x8F: "topic filter invalid",
    0x90: "topic name invalid",
    0x91: "packet identifier in use",
    0x92: "packet identifier not found",
    0x93: "receive maximum exceeded",
    0x94: "topic alias invalid",
    0x95: "packet too large",
    0x97: "quota exceeded",
    0x99: "payload format invalid",
    0x9C: "use another server",
    0x9D: "server moved",
    0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded",
    0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported",
    0xA2: "wildcard subscriptions not supported",
}


def reason_text(code: int) -> str:
    return REASONS.get(code, f"reason code 0x{code:02x}")
