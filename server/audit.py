"""Audit: re-verify a device's stored chain from the raw envelopes, as an outsider would.

Nothing derived is trusted here: each stored envelope is checked against the registry's public key
for its key id, decoded strictly, and linked to the one before by its hash. The first thing that does
not hold is reported with its sequence number.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from battery_trace.protocol import envelope, events
from battery_trace.server.records import KeyRecord


@dataclass(frozen=True)
class ChainAudit:
    kid: str
    state: str
    checked: int  # envelopes verified before the first break (or all of them)
    head: int  # the highest sequence number reached without a break
    first_break: dict[str, object] | None

    def to_json(self) -> dict[str, object]:
        return {
            "kid": self.kid,
            "state": self.state,
            "checked": self.checked,
            "head": self.head,
            "intact": self.first_break is None,
            "first_break": self.first_break,
        }


def audit_chain(key: KeyRecord, rows: Iterable[tuple[int, bytes]]) -> ChainAudit:
    expected, prev, checked = 1, events.ZERO_HASH, 0

    def broken(seq: int, problem: str) -> ChainAudit:
        return ChainAudit(key.kid.hex(), key.state, checked, expected - 1, {"seq": seq, "problem": problem})

    for seq, raw in rows:
        if seq != expected:
            return broken(expected, f"seq {expected}..{seq - 1} missing")
        try:
            # As stored: accepted under the rules of its day (canonical=False), verified as it is.
            env = envelope.verify(envelope.decode(raw, max_size=len(raw), canonical=False), key.public)
            event = events.decode(env.payload)
        except (envelope.EnvelopeError, events.EventError) as exc:
            return broken(seq, f"stored envelope does not verify: {exc}")
        if env.kid != key.kid:
            return broken(seq, "stored under another key id than its envelope names")
        if event.seq != seq or event.device != key.device:
            return broken(seq, f"envelope says {event.device} seq {event.seq}")
        if event.prev != prev:
            return broken(seq, f"does not link to seq {seq - 1} (prev {event.prev.hex()[:16]}...)")
        prev, expected, checked = env.hash, expected + 1, checked + 1
    return ChainAudit(key.kid.hex(), key.state, checked, expected - 1, None)
