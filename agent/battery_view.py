"""The battery view: what is known right now about the battery on each slot or port.

Readings from several sources and moments merge here: identity (the GB/T 34014 code, and where it
came from) and health (the latest value of each quantity). A slot is occupied while readings keep
arriving; when they stop for ``absent_after_s`` the battery is taken to be gone and its state is
cleared, so one battery's values never leak into the next one's. Workflows read this view; they
never look at frames.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from battery_trace.agent.identity import Bindings
from battery_trace.agent.readings import Health, Identity, Reading
from battery_trace.protocol import battery_code


@dataclass
class SlotState:
    code: str | None = None
    code_source: str | None = None
    secondary: str | None = None
    details: dict[str, object] = field(default_factory=dict)  # e.g. the vehicle's VIN from a BRM
    health: Health = field(default_factory=Health)
    health_at: float | None = None
    seen_at: float | None = None
    arrived_at: float | None = None  # the first reading of this battery on this slot
    fixed: bool = False  # the code comes from configuration (a pack permanently wired to a gateway)

    @property
    def occupied(self) -> bool:
        return self.seen_at is not None

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
        now = time.time() if at is None else at
        state = self.slot(slot)
        if state.seen_at is None:
            state.seen_at = state.arrived_at = now
            self._notify("inserted", slot, state)
        state.seen_at = now
        if isinstance(reading, Health):
            state.health = state.health.merged(reading)
            state.health_at = now
        elif isinstance(reading, Identity):
            self._identity(state, reading)

    def _identity(self, state: SlotState, reading: Identity) -> None:
        if reading.details:
            state.details.update(reading.details)
        if reading.secondary:
            state.secondary = reading.secondary
        if reading.code:
            try:
                code = battery_code.parse(reading.code).code
            except battery_code.CodeError:
                # Never bind or seal a code read wrongly; the sealer would refuse it anyway.
                self.invalid_codes += 1
                return
            if not state.fixed:
                state.code, state.code_source = code, reading.source
        if self.bindings is None or state.secondary is None:
            return
        if state.code and state.code_source != "binding":
            self.bindings.bind(state.secondary, state.code, state.code_source or "unknown")
        elif state.code is None:
            bound = self.bindings.code_for(state.secondary)
            if bound:
                state.code, state.code_source = bound, "binding"

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
        """Slots whose battery stopped talking: cleared, and reported as removed."""
        now = time.time() if now is None else now
        gone = []
        for slot, state in self.slots.items():
            if state.seen_at is not None and now - state.seen_at > self.absent_after_s:
                self._notify("removed", slot, state)
                self.slots[slot] = self._fresh(state)
                gone.append(slot)
        return gone
