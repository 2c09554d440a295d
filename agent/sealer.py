"""The sealer: turns a workflow's draft into a signed, chained event in the outbox.

It is the last line where the agent can refuse: a draft that breaks the event schema, or names a
battery code that breaks GB/T 34014, is never signed. Signing a wrong code would put the device's
signature under a false identity; instead it is logged with the reason and counted.

It is also where a draft waits when the outbox cannot take it (a full disk): a lifecycle draft is held,
in order, and sealed when a write succeeds again; it leaves the sealer only once its seal commits.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from battery_trace.agent.outbox import Outbox, OutboxError
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


class Held(Exception):
    """Not sealed yet: the outbox cannot be written, and the sealer keeps the draft until it can."""


class Sealer:
    """Seals drafts into the outbox; refuses what must not be signed; keeps the outbox within its budget.

    Under the disk budget nothing sealed is ever deleted (that would be a hole in the chain). Instead,
    health snapshots are thinned before they are sealed: from 80 % of the budget only one in four of
    each slot's is kept (counted per slot: one count for all slots keeps the same slots' snapshots at
    every tick and none of the others'), above it none. Above the budget the alarm is raised, whatever
    is being sealed; lifecycle events are still sealed. It clears when receipts have pruned the outbox
    under its budget again.

    When the outbox cannot be written at all (its filesystem is full, whatever the budget says), a
    running agent (``hold=True``) keeps each lifecycle draft in memory, in order, raises the alarm and
    seals them first as soon as a write succeeds (``retry`` is called every tick); health snapshots
    are dropped meanwhile. A one-shot caller (``emit``) gets the OutboxError instead.
    """

    THIN_FROM = 0.8
    THIN_KEEP_ONE_IN = 4
    # Lifecycle events come at the pace of people and vehicles (a busy station: hundreds a day), so this
    # is weeks of a full disk; past it the alarm has long been raised and new drafts are refused, loudly.
    HELD_MAX = 10_000

    def __init__(
        self,
        outbox: Outbox,
        key: PrivateKey,
        device: str,
        role: str | None = None,
        budget_bytes: int | None = None,
        hold: bool = False,
    ) -> None:
        self.outbox = outbox
        self.key = key
        self.kid = key.public.kid
        self.device = device
        self.role = role
        self.budget_bytes = budget_bytes
        self.hold = hold
        self.refused: Counter[str] = Counter()
        self.write_errors: Counter[str] = Counter()
        self.sealed = 0
        self.held: deque[Draft] = deque()
        self.budget_alarm: str | None = None
        self.write_failure: OutboxError | None = None  # why the last write failed, until one succeeds
        self._health_seen: Counter[object] = Counter()  # per slot (or per code, for a draft without one)

    @property
    def alarm(self) -> str | None:
        """What an operator must act on, or None."""
        if self.write_failure is not None:
            return (
                f"{self.write_failure}; {len(self.held)} lifecycle event(s) held in memory until it can be "
                "written, health snapshots dropped"
            )
        return self.budget_alarm

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
        misread = events.vin_problems(probe)
        if misread:
            raise Refused("invalid_vin", "; ".join(map(str, misread)))

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
        if not self.hold:
            return self._append(draft)
        self.retry()  # what waits goes first: the chain keeps the order things happened in
        if not self.held:
            try:
                return self._append(draft)
            except OutboxError:
                pass  # counted and alarmed in _append
        return self._keep(draft)

    def retry(self) -> int:
        """Seal held drafts in order until one fails; returns how many were sealed."""
        done = 0
        while self.held:
            try:
                self._append(self.held[0])
            except OutboxError:
                break
            self.held.popleft()
            done += 1
        return done

    def _keep(self, draft: Draft) -> int:
        """A draft the outbox cannot take now: a health snapshot is dropped, a lifecycle event held."""
        if draft.type == "health":
            reason = "disk_full" if self.write_failure is None or self.write_failure.full else "outbox_error"
            self.refused[reason] += 1
            raise Refused(reason, "the outbox cannot be written; health snapshots are dropped meanwhile")
        if len(self.held) >= self.HELD_MAX:
            self.refused["held_full"] += 1
            log.error(
                "NOT SEALED: a %s event; %d are already held and the outbox still cannot be written",
                draft.type,
                len(self.held),
            )
            raise Refused("held_full", f"{len(self.held)} events already wait for the outbox; free its disk")
        self.held.append(draft)
        log.error("a %s event is held in memory (%d waiting): %s", draft.type, len(self.held), self.write_failure)
        raise Held(self.alarm)

    def _append(self, draft: Draft) -> int:
        def build(seq: int, prev: bytes) -> tuple[bytes, bytes, str]:
            event = events.Event(self.device, seq, prev, draft.time_ms, draft.type, draft.source, draft.fields)
            sealed = envelope.sign(events.encode(event), self.key)
            return sealed, envelope.envelope_hash(sealed), draft.type

        try:
            seq = self.outbox.append(self.kid, build)
        except OutboxError as exc:
            self.write_errors["disk_full" if exc.full else "other"] += 1
            if self.write_failure is None:
                log.error("%s", exc)
            self.write_failure = exc
            raise
        if self.write_failure is not None:
            log.warning("the outbox can be written again (%d held events still to seal)", len(self.held))
            self.write_failure = None
        self.sealed += 1
        return seq

    def _budget(self, draft: Draft) -> None:
        if self.budget_bytes is None:
            return
        used = self.budget_used()
        self._budget_alarm(used)
        if used <= self.THIN_FROM or draft.type != "health":
            return
        whose = draft.fields.get("slot", draft.fields.get("code"))
        self._health_seen[whose] += 1
        if used > 1.0 or self._health_seen[whose] % self.THIN_KEEP_ONE_IN != 1:
            raise Refused("thinned", f"outbox at {used:.0%} of its budget: health snapshots are thinned")

    def budget_used(self) -> float:
        """The outbox's size as a fraction of its budget (0 without one)."""
        return self.outbox.size_bytes() / self.budget_bytes if self.budget_bytes else 0.0

    def _budget_alarm(self, used: float) -> None:
        if used <= 1.0:
            if self.budget_alarm is not None:
                log.warning("the outbox is back within its disk budget (%.0f%%)", used * 100)
            self.budget_alarm = None
            return
        if self.budget_alarm is None:
            log.error("outbox over its disk budget (%.0f%%): health snapshots are not sealed", used * 100)
        self.budget_alarm = (
            f"outbox over its disk budget ({used:.0%}): health snapshots are not sealed, lifecycle events still are"
        )
