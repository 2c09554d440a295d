"""Typed records that cross the server's boundaries: registry keys, verification outcomes."""

from __future__ import annotations

from dataclasses import dataclass

from battery_trace.protocol.envelope import Envelope
from battery_trace.protocol.events import Event, FieldError
from battery_trace.protocol.keys import PublicKey


@dataclass(frozen=True)
class KeyRecord:
    kid: bytes
    device: str
    role: str
    public: PublicKey
    state: str  # "active" or "revoked"
    valid_from: float
    valid_until: float | None
    revoked_at: float | None


@dataclass(frozen=True)
class Accepted:
    """A message whose signature, key, device, role and schema all check out."""

    topic: str
    envelope: Envelope
    event: Event
    kid: bytes
    code_problems: tuple[FieldError, ...]


@dataclass(frozen=True)
class Rejected:
    """A message that goes to quarantine: ``reason`` is a stable short name, ``detail`` says why."""

    topic: str
    raw: bytes
    reason: str
    detail: str
