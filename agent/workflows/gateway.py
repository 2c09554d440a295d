"""BMS gateway: a periodic ``health`` snapshot of every pack in service that has an identity.

The same snapshot serves a swap station's stock and a maintenance rig's connected pack. Its schedule and
the freshness of what it reports run on the monotonic clock (``now`` is ``time.monotonic()``); an event's
time is the wall-clock moment the health was measured.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from battery_trace.agent.battery_view import BatteryView
from battery_trace.agent.sealer import Draft, Refused

log = logging.getLogger(__name__)


def health_drafts(
    view: BatteryView, now: float, max_age_s: float, since: dict[int, float], counters: Counter[str] | None = None
) -> list[Draft]:
    """One health draft per slot whose identity is known and whose health is fresh and new since the
    slot's last snapshot (``since``, updated here): a pack that stopped talking is not reported again.
    A code that two slots claim at once is reported for neither: one of them is not that battery."""
    drafts = []
    shared = view.codes_on_two_slots()
    for slot, state in sorted(view.slots.items()):
        if state.code is None or state.code_source is None or state.health_mono is None or state.health_at is None:
            continue
        if now - state.health_mono > max_age_s or state.health_mono <= since.get(slot, float("-inf")):
            continue  # a stale reading, or one already reported, is not a snapshot of now
        since[slot] = state.health_mono
        if state.code in shared:
            if counters is not None:
                counters["health_refused_code_on_two_slots"] += 1
            log.warning("slot %s: no health sealed for %s: another slot reports the same code", slot, state.code)
            continue
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
        self._next_health = time.monotonic() + health_interval_s
        self._reported: dict[int, float] = {}
        self.counters: Counter[str] = Counter()

    def tick(self, now: float) -> None:
        """Called every second, or every health interval when that is shorter, with ``time.monotonic()``:
        snapshots when they are due."""
        if now < self._next_health:
            return
        self._next_health = now + self.health_interval_s
        for draft in health_drafts(self.view, now, max(3 * self.health_interval_s, 10), self._reported, self.counters):
            with contextlib.suppress(Refused):  # logged and counted by the sealer
                self.seal(draft)
