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

from battery_trace.agent.outbox import Outbox
from battery_trace.protocol import envelope, events
from battery_trace.protocol.keys import PrivateKey

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
    """Seals drafts into the outbox; refuses what must not be signed; keeps the outbox within its budget.

    Under the disk budget nothing sealed is ever deleted (that would be a hole in the chain). Instead,
    health snapshots are thinned before they are sealed: from 80 % of the budget only one in four is
    kept, above it none. Lifecycle events are always sealed; above the budget they raise an alarm.
    """

    THIN_FROM = 0.8
    THIN_KEEP_ONE_IN = 4

    def __init__(
        self, outbox: Outbox, key: PrivateKey, device: str, role: str | None = None, budget_bytes: int | None = None
    ) -> None:
        self.outbox = outbox
        self.key = key
        self.kid = key.public.kid
        self.device = device
        self.role = role
        self.budget_bytes = budget_bytes
        self.refused: Counter[str] = Counter()
        self.sealed = 0
        self.alarm: str | None = None
        self._health_seen = 0

    def check(self, draft: Draft) -> None:
        """Raise Refused when the draft must not be signed."""
        errors = events.body_errors(draft.type, draft.source, draft.fields)
        if errors:
            raise Refused("schema", "; ".join(map(str, errors)))
        if self.role is not None and self.role not in events.roles_for(draft.type):
            allowed = ", ".join(events.roles_for(draft.type))
            raise Refused(
                "role", f"a {self.role} may not sign {draft.type!r} (the server would refuse it); by: {allowed}"
            )
        probe = events.Event(self.device, 1, events.ZERO_HASH, draft.time_ms, draft.type, draft.source, draft.fields)
        problems = events.code_problems(probe)
        if problems:
            raise Refused("invalid_code", "; ".join(map(str, problems)))

    def seal(self, draft: Draft) -> int:
        """Seal ``draft`` into the outbox and return its sequence number, or raise Refused."""
        try:
            self.check(draft)
            self._budget(draft)
        except Refused as exc:
            self.refused[exc.reason] += 1
            if exc.reason != "thinned":
                log.warning("refusing to seal a %s event: %s", draft.type, exc)
            raise

        def build(seq: int, prev: bytes) -> tuple[bytes, bytes, str]:
            event = events.Event(self.device, seq, prev, draft.time_ms, draft.type, draft.source, draft.fields)
            sealed = envelope.sign(events.encode(event), self.key)
            return sealed, envelope.envelope_hash(sealed), draft.type

        seq = self.outbox.append(self.kid, build)
        self.sealed += 1
        return seq

    def _budget(self, draft: Draft) -> None:
        if self.budget_bytes is None:
            return
        used = self.outbox.size_bytes() / self.budget_bytes
        if used <= self.THIN_FROM:
            self.alarm = None
            return
        if draft.type != "health":
            if used > 1.0:
                self.alarm = f"outbox over its disk budget ({used:.0%}); lifecycle events are still sealed"
                log.error("%s", self.alarm)
            return
        self._health_seen += 1
        if used > 1.0 or self._health_seen % self.THIN_KEEP_ONE_IN:
            raise Refused("thinned", f"outbox at {used:.0%} of its budget: health snapshots are thinned")
