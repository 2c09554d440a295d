"""BMS gateway: a periodic ``health`` snapshot of every pack in service that has an identity.

The same snapshot serves a swap station's stock and a maintenance rig's connected pack.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from battery_trace.agent.battery_view import BatteryView
from battery_trace.agent.sealer import Draft, Refused


def health_drafts(view: BatteryView, now: float, max_age_s: float, since: dict[int, float]) -> list[Draft]:
    """One health draft per slot whose identity is known and whose health is fresh and new since the
    slot's last snapshot (``since``, updated here): a pack that stopped talking is not reported again."""
    drafts = []
    for slot, state in sorted(view.slots.items()):
        if state.code is None or state.code_source is None or state.health_at is None:
            continue
        if now - state.health_at > max_age_s or state.health_at <= since.get(slot, 0.0):
            continue  # a stale reading, or one already reported, is not a snapshot of now
        since[slot] = state.health_at
        health = state.health.to_event()
        if not health:
            continue
        # The event's time is when the health was measured, not when the snapshot was taken.
        fields = {"code": state.code, "health": health, "slot": slot}
        drafts.append(Draft("health", state.code_source, fields, int(state.health_at * 1000)))
    return drafts


class Gateway:
    def __init__(self, view: BatteryView, seal: Callable[[Draft], int], health_interval_s: float) -> None:
        self.view = view
        self.seal = seal
        self.health_interval_s = health_interval_s
        self._next_health = time.time() + health_interval_s
        self._reported: dict[int, float] = {}

    def tick(self, now: float) -> None:
        """Called every second, or every health interval when that is shorter: snapshots when they are due."""
        if now < self._next_health:
            return
        self._next_health = now + self.health_interval_s
        for draft in health_drafts(self.view, now, max(3 * self.health_interval_s, 10), self._reported):
            with contextlib.suppress(Refused):  # logged and counted by the sealer
                self.seal(draft)
