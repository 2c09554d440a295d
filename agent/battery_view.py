"""The battery view: what is known right now about the battery on each slot or port.

Readings from several sources and moments merge here: identity (the GB/T 34014 code, and where it
came from) and health (the latest value of each quantity). A slot is occupied while readings keep
arriving; when they stop for ``absent_after_s`` the battery is taken to be gone and its state is
cleared, so one battery's values never leak into the next one's. A change of identity (another
secondary identity, another code) means another battery, even within that time: the slot starts
afresh and nothing is bound across the change. A secondary identity seen on two slots at once is
not an identity (cheap BMS firmware sends constants): it is distrusted, for good, and says so.
Workflows read this view; they never look at frames.

Durations (silence, freshness) run on ``time.monotonic()``: a wall clock stepped by NTP must never
make a battery vanish or stop its snapshots. The wall clock only stamps when something happened.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from battery_trace.agent.identity import Bindings
from battery_trace.agent.readings import Health, Identity, Reading
from battery_trace.protocol import battery_code

log = logging.getLogger(__name__)

# Weakest first: the source an event names when two readings of different strength went into it.
SOURCE_STRENGTH = ("binding", "manual", "can", "bms", "label")


def weaker(a: str | None, b: str | None) -> str:
    """The weaker of two identity sources (an unknown one counts as a binding)."""
    rank = {s: i for i, s in enumerate(SOURCE_STRENGTH)}
    return min((a or "binding", b or "binding"), key=lambda s: rank.get(s, 0))


@dataclass
class SlotState:
    code: str | None = None
    code_source: str | None = None
    secondary: str | None = None
    details: dict[str, object] = field(default_factory=dict)  # e.g. the vehicle's VIN from a BRM
    health: Health = field(default_factory=Health)
    health_at: float | None = None  # wall clock: when the health was measured (an event's time)
    seen_at: float | None = None  # wall clock, for people
    arrived_at: float | None = None  # wall clock: the first reading of this battery on this slot
    health_mono: float | None = None  # monotonic twins of the above, for every duration
    seen_mono: float | None = None
    fixed: bool = False  # the code comes from configuration (a pack permanently wired to a gateway)

    @property
    def occupied(self) -> bool:
        return self.seen_at is not None

    def health_age(self, now: float | None = None) -> float | None:
        """Seconds since the health was measured (monotonic), None when there is none."""
        if self.health_mono is None:
            return None
        return (time.monotonic() if now is None else now) - self.health_mono

    def snapshot(self) -> dict[str, object]:
        return {
            "code": self.code,
            "code_source": self.code_source,
            "secondary": self.secondary,
            "occupied": self.occupied,
            "health": self.health.to_event(),
            "health_at": self.health_at,
            "seen_at": self.seen_at,
        }


class BatteryView:
    def __init__(self, bindings: Bindings | None = None, absent_after_s: float = 30.0) -> None:
        self.slots: dict[int, SlotState] = {}
        self.bindings = bindings
        self.absent_after_s = absent_after_s
        self.invalid_codes = 0
        self.counters: Counter[str] = Counter()  # identity changes, implausible values by field
        self.listeners: list[Callable[[str, int, SlotState], None]] = []  # ("inserted"|"removed", slot, state)

    def slot(self, slot: int) -> SlotState:
        return self.slots.setdefault(slot, SlotState())

    def set_code(self, slot: int, code: str, source: str) -> None:
        state = self.slot(slot)
        state.code, state.code_source, state.fixed = code, source, True

    def _notify(self, what: str, slot: int, state: SlotState) -> None:
        for listener in self.listeners:
            listener(what, slot, state)

    def update(self, slot: int, reading: Reading, at: float | None = None) -> None:
        """Merge a reading; ``at`` (wall clock) is when it was taken when that was not just now."""
        wall, mono = time.time(), time.monotonic()
        if at is not None:  # a reading handed in late: the same moment on both clocks
            mono -= max(0.0, wall - at)
            wall = at
        state = self.slot(slot)
        if isinstance(reading, Identity) and self._another_battery(state, reading):
            state = self._replace(slot, state)
        if state.seen_at is None:
            state.seen_at = state.arrived_at = wall
            state.seen_mono = mono
            self._notify("inserted", slot, state)
        state.seen_at, state.seen_mono = wall, mono
        if isinstance(reading, Health):
            self._health(state, reading)
            state.health_at, state.health_mono = wall, mono
        elif isinstance(reading, Identity):
            self._identity(slot, state, reading)

    def _health(self, state: SlotState, reading: Health) -> None:
        before = set(state.health.implausible())
        state.health = state.health.merged(reading)
        for fault in set(state.health.implausible()) - before:
            self.counters[fault] += 1
            log.warning("a reading no pack can give: %s (kept as read, flagged in its snapshot)", fault)

    def _another_battery(self, state: SlotState, reading: Identity) -> bool:
        """A secondary identity or code other than the slot's: the battery was changed in between."""
        if reading.secondary and state.secondary and reading.secondary != state.secondary:
            return True
        model, known = reading.details.get("bms_model"), state.details.get("bms_model")
        if model and known and model != known:  # one model string says nothing; two say two packs
            return True
        return bool(reading.code and state.code and not state.fixed and self._normal(reading.code) != state.code)

    @staticmethod
    def _normal(code: str) -> str | None:
        try:
            return battery_code.parse(code).code
        except battery_code.CodeError:
            return None

    def _replace(self, slot: int, state: SlotState) -> SlotState:
        self.counters["battery_changed"] += 1
        log.info("slot %s: another battery's identity, within %s s: a new battery", slot, self.absent_after_s)
        self._notify("removed", slot, state)
        fresh = self.slots[slot] = self._fresh(state)
        return fresh

    def _identity(self, slot: int, state: SlotState, reading: Identity) -> None:
        if reading.details:
            state.details.update(reading.details)
        if reading.secondary:
            state.secondary = reading.secondary
            self._check_unique(slot, reading.secondary)
        if reading.code:
            code = self._normal(reading.code)
            if code is None:
                # Never bind or seal a code read wrongly; the sealer would refuse it anyway.
                self.invalid_codes += 1
                return
            if not state.fixed:
                state.code, state.code_source = code, reading.source
        if self.bindings is None or state.secondary is None or self.bindings.distrusted(state.secondary):
            return
        if state.code and state.code_source != "binding":
            if not self.bindings.bind(state.secondary, state.code, state.code_source or "unknown"):
                bound = self.bindings.code_for(state.secondary)
                self._distrust(state.secondary, f"bound to {bound}, and seen with {state.code}")
        elif state.code is None:
            bound = self.bindings.code_for(state.secondary)
            if bound:
                state.code, state.code_source = bound, "binding"

    def _check_unique(self, slot: int, secondary: str) -> None:
        others = [n for n, s in self.slots.items() if n != slot and s.occupied and s.secondary == secondary]
        if others and self.bindings is not None and not self.bindings.distrusted(secondary):
            self._distrust(secondary, f"seen on slots {sorted([slot, *others])} at once")

    def _distrust(self, secondary: str, why: str) -> None:
        """A secondary identity that is not one pack's: no code comes from it again, on any slot."""
        assert self.bindings is not None
        self.bindings.distrust(secondary, why)
        for state in self.slots.values():
            if state.secondary == secondary and state.code_source == "binding":
                state.code = state.code_source = None

    def codes_on_two_slots(self) -> set[str]:
        """Codes that occupied slots share: one of them, at least, is not that battery."""
        seen: Counter[str] = Counter(s.code for s in self.slots.values() if s.occupied and s.code and not s.fixed)
        return {code for code, n in seen.items() if n > 1}

    def vacate(self, slot: int, arrived_before: float | None = None) -> None:
        """The battery on ``slot`` is known to have left (a PLC said so): forget it now, not after the
        silence timeout, so the next battery's identity can never be confused with it.

        ``arrived_before`` spares a battery that arrived after that moment: serial sources race, so
        the scanner may read the battery placed in a slot before the PLC line saying so is handled.
        """
        state = self.slots.get(slot)
        if state is None or state.seen_at is None:
            return
        if arrived_before is not None and state.arrived_at is not None and state.arrived_at >= arrived_before:
            return
        self._notify("removed", slot, state)
        self.slots[slot] = self._fresh(state)

    @staticmethod
    def _fresh(state: SlotState) -> SlotState:
        fresh = SlotState()
        if state.fixed:
            fresh.code, fresh.code_source, fresh.fixed = state.code, state.code_source, True
        return fresh

    def expire(self, now: float | None = None) -> list[int]:
        """Slots whose battery stopped talking (``now`` is monotonic): cleared, and reported as removed."""
        now = time.monotonic() if now is None else now
        gone = []
        for slot, state in self.slots.items():
            if state.seen_mono is not None and now - state.seen_mono > self.absent_after_s:
                self._notify("removed", slot, state)
                self.slots[slot] = self._fresh(state)
                gone.append(slot)
        return gone
