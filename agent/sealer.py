"""The sealer: turns a workflow's draft into a signed, chained event in the outbox.

It is the last line where the agent can refuse: a draft that breaks the event schema, or names a
battery code that breaks GB/T 34014, is never signed. Signing a wrong code would put the device's
signature under a false identity; instead it is logged with the reason and counted.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.outbox import Outbox
from protocol import envelope, events
from protocol.keys import PrivateKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Draft:
    """What a workflow decided happened, before it has a place in the chain."""

    type: str
    source: str
    fields: dict[str, Any]
    time_ms: int = field(default_factory=lambda: int(time.time() * 1000))


class Refused(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class Sealer:
    def __init__(self, outbox: Outbox, key: PrivateKey, device: str) -> None:
        self.outbox = outbox
        self.key = key
        self.kid = key.public.kid
        self.device = device
        self.refused: Counter[str] = Counter()
        self.sealed = 0

    def check(self, draft: Draft) -> None:
        """Raise Refused when the draft must not be signed."""
        errors = events.body_errors(draft.type, draft.source, draft.fields)
        if errors:
            raise Refused("schema", "; ".join(map(str, errors)))
        probe = events.Event(self.device, 1, events.ZERO_HASH, draft.time_ms, draft.type, draft.source, draft.fields)
        problems = events.code_problems(probe)
        if problems:
            raise Refused("invalid_code", "; ".join(map(str, problems)))

    def seal(self, draft: Draft) -> int:
        """Seal ``draft`` into the outbox and return its sequence number, or raise Refused."""
        try:
            self.check(draft)
        except Refused as exc:
            self.refused[exc.reason] += 1
            log.warning("refusing to seal a %s event: %s", draft.type, exc)
            raise

        def build(seq: int, prev: bytes) -> tuple[bytes, bytes, str]:
            event = events.Event(self.device, seq, prev, draft.time_ms, draft.type, draft.source, draft.fields)
            sealed = envelope.sign(events.encode(event), self.key)
            return sealed, envelope.envelope_hash(sealed), draft.type

        seq = self.outbox.append(self.kid, build)
        self.sealed += 1
        return seq
