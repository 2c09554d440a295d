"""Verification of one incoming message, in the order of DESIGN.md §5.2; each failure a named reason.

Pure apart from the key lookup it is given: no clock of its own, no store writes. Sequence and chain
questions (duplicates, links) need the store and are answered when the batch commits.
"""

from __future__ import annotations

from collections.abc import Callable

from protocol import cbor, envelope, events, topics
from server.records import Accepted, KeyRecord, Rejected

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
)


def verify_message(
    topic: str,
    raw: bytes,
    lookup: Callable[[bytes], KeyRecord | None],
    received_at: float,
    max_size: int,
) -> Accepted | Rejected:
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
    record = lookup(env.kid)
    if record is None:
        return reject("unknown_key", f"key id {env.kid.hex()} is not enrolled")
    if record.revoked_at is not None and received_at >= record.revoked_at:
        return reject("key_revoked", f"key {env.kid.hex()} of {record.device} was revoked")
    if received_at < record.valid_from or (record.valid_until is not None and received_at > record.valid_until):
        return reject("key_not_active", f"key {env.kid.hex()} of {record.device} is not valid at this time")
    try:
        envelope.verify(env, record.public)
    except envelope.EnvelopeError as exc:
        return reject(exc.reason, str(exc))
    try:
        claims = cbor.decode(env.payload)
    except cbor.CborError as exc:
        return reject("schema", f"payload is not CBOR: {exc}")
    claimed = claims if isinstance(claims, dict) else {}
    payload_device = claimed.get("device")
    if not (payload_device == record.device == topic_device):
        return reject(
            "device_mismatch",
            f"payload device {payload_device!r}, key's device {record.device!r} "
            f"and topic device {topic_device!r} must agree",
        )
    event_type = claimed.get("type")
    if event_type in events.EVENT_TYPES and record.role not in events.roles_for(event_type):
        allowed = ", ".join(events.roles_for(event_type))
        return reject("role_not_allowed", f"a {record.role} may not sign {event_type!r} (allowed: {allowed})")
    try:
        event = events.decode(env.payload)
    except events.EventError as exc:
        return reject("schema", str(exc))
    return Accepted(topic, env, event, env.kid, tuple(events.code_problems(event)))
