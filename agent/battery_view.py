"""The battery view: what is known right now about the battery on each slot or port.

Readings from several sources and moments merge here: identity (the GB/T 34014 code and where it
came from) and health (the latest value of each quantity). Workflows read this view; they never
look at frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.readings import Health, Identity, Reading


@dataclass
class SlotState:
    code: str | None = None
    code_source: str | None = None
    secondary: str | None = None
    health: Health = field(default_factory=Health)
    health_at: float | None = None


class BatteryView:
    def __init__(self) -> None:
        self.slots: dict[int, SlotState] = {}

    def slot(self, slot: int) -> SlotState:
        return self.slots.setdefault(slot, SlotState())

    def set_code(self, slot: int, code: str, source: str) -> None:
        state = self.slot(slot)
        state.code, state.code_source = code, source

    def update(self, slot: int, reading: Reading, at: float | None = None) -> None:
        state = self.slot(slot)
        if isinstance(reading, Health):
            state.health = state.health.merged(reading)
            state.health_at = time.time() if at is None else at
        elif isinstance(reading, Identity):
            if reading.code:
                state.code, state.code_source = reading.code, reading.source
            if reading.secondary:
                state.secondary = reading.secondary
