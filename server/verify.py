"""Verification of one incoming message, in the order of DESIGN.md §5.2; each failure a named reason.

Two steps so the intake can look up every key of a batch in one query: ``parse`` needs only the
bytes (size, topic, envelope structure, key id), ``check`` needs the key's registry record. Pure apart
from that: no clock of its own, no writes. Sequence and chain questions (duplicates, links) need the
store and are answered when the batch commits.
"""

from __future__ import annotations

from dataclasses import dataclass

from battery_trace.protocol import cbor, envelope, events, topics
from battery_trace.protocol.keys import PublicKey
from battery_trace.protocol.text import shown
from battery_trace.server.records import Accepted, KeyRecord, Rejected

REASONS = (
    "too_large",
    "bad_topic",
    "malformed",
    "unknown_key",
    "key_not_active",
    "key_revoked",
    "unsupported_algorithm",
    "bad_signature",
    "device_mismatch",
    "role_not_allowed",
    "schema",
    "sequence_reused",  # decided at commit: a validly signed second event under a stored sequence number
    "store_refused",  # decided at commit: the database refused this one event; the rest of its batch is stored
)


@dataclass(frozen=True)
class Parsed:
    topic: str
    raw: bytes
    topic_device: str
    envelope: envelope.Envelope
    kid: bytes


def parse(topic: str, raw: bytes, max_size: int) -> Parsed | Rejected:
    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(topic, raw, reason, detail)

    if len(raw) > max_size:
        return reject("too_large", f"{len(raw)} bytes; the limit is {max_size}")
    try:
        topic_device, kind = topics.parse(topic)
    except topics.TopicError as exc:
        return reject("bad_topic", str(exc))
    if kind != "events":
        return reject("bad_topic", f"events arrive on {topics.PREFIX}/<device>/events, not {kind}")
    try:
        env = envelope.decode(raw, max_size=max_size)
    except envelope.EnvelopeError as exc:
        return reject(exc.reason, str(exc))
    if env.kid is None:
        return reject("unknown_key", "the envelope names no key id (kid)")
    return Parsed(topic, raw, topic_device, env, env.kid)


def precheck(p: Parsed, record: KeyRecord | None, received_at: float) -> Rejected | None:
    """The steps before the signature: the key's registration and state, the envelope's headers."""

    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(p.topic, p.raw, reason, detail)

    if record is None:
        return reject("unknown_key", f"key id {p.kid.hex()} is not enrolled")
    if record.revoked_at is not None and received_at >= record.revoked_at:
        return reject("key_revoked", f"key {p.kid.hex()} of {record.device} was revoked")
    if received_at < record.valid_from:
        return reject("key_not_active", f"key {p.kid.hex()} of {record.device} is not valid before its enrolment")
    try:
        envelope.check_headers(p.envelope)
    except envelope.EnvelopeError as exc:
        return reject(exc.reason, str(exc))
    return None


def signature_job(p: Parsed, record: KeyRecord) -> tuple[PublicKey, bytes, bytes]:
    """What the signature check needs: key, signed bytes (Sig_structure), signature."""
    return record.public, p.envelope.sig_structure(), p.envelope.signature


def bad_signature(p: Parsed) -> Rejected:
    return Rejected(p.topic, p.raw, "bad_signature", envelope.BAD_SIGNATURE)


def postcheck(p: Parsed, record: KeyRecord) -> Accepted | Rejected:
    """The steps after the signature: payload, device, role, schema, the key's retirement. Pure, so
    the intake may run them while the signature is still being checked, and use them only if it holds."""

    def reject(reason: str, detail: str) -> Rejected:
        return Rejected(p.topic, p.raw, reason, detail)

    # One strict, deterministic decode serves every later step; only a payload that is not in the
    # deterministic form is decoded a second time, leniently, so device and role still come first.
    encoding_problem = None
    try:
        claims = cbor.decode(p.envelope.payload, deterministic=True)
    except cbor.CborError as exc:
        encoding_problem = str(exc)
        try:
            claims = cbor.decode(p.envelope.payload)
        except cbor.CborError as exc2:
            return reject("schema", f"payload is not CBOR: {exc2}")
    claimed = claims if isinstance(claims, dict) else {}
    payload_device = claimed.get("device")
    if not (payload_device == record.device == p.topic_device):
        return reject(
            "device_mismatch",
            f"payload device {shown(payload_device)}, key's device {record.device!r} "
            f"and topic device {p.topic_device!r} must agree",
        )
    event_type = claimed.get("type")
    if event_type in events.EVENT_TYPES and record.role not in events.roles_for(event_type):
        allowed = ", ".join(events.roles_for(event_type))
        return reject("role_not_allowed", f"a {record.role} may not sign {event_type!r} (allowed: {allowed})")
    if encoding_problem:
        return reject("schema", f"$: {encoding_problem}")
    try:
        event = events.from_map(claims)
    except events.EventError as exc:
        return reject("schema", str(exc))
    if record.valid_until is not None and event.time_ms > record.valid_until * 1000:
        # A retired (rotated-out) key: what it sealed before the rotation still counts, nothing after.
        kid = p.kid.hex()
        return reject("key_not_active", f"key {kid} of {record.device} was retired before this event's time")
    return Accepted(p.topic, p.envelope, event, p.kid, tuple(events.code_problems(event)))


def check(p: Parsed, record: KeyRecord | None, received_at: float) -> Accepted | Rejected:
    """Every step in order, on this thread."""
    rejected = precheck(p, record, received_at)
    if rejected is not None:
        return rejected
    assert record is not None  # precheck refuses an unknown key
    key, signed, signature = signature_job(p, record)
    if not key.verify(signed, signature):
        return bad_signature(p)
    return postcheck(p, record)
