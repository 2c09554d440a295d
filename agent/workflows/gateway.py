"""BMS gateway: a periodic ``health`` snapshot of every pack in service that has an identity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent.battery_view import BatteryView
from agent.sealer import Draft, Refused

log = logging.getLogger(__name__)


def health_drafts(view: BatteryView, now: float, max_age_s: float) -> list[Draft]:
    """One health draft per slot whose identity is known and whose health is fresh."""
    drafts = []
    for slot, state in sorted(view.slots.items()):
        if state.code is None or state.code_source is None or state.health_at is None:
            continue
        if now - state.health_at > max_age_s:
            continue  # a stale reading is not a snapshot of now
        health = state.health.to_event()
        if not health:
            continue
        drafts.append(
            Draft(
                "health",
                state.code_source,
                {"code": state.code, "health": health, "slot": slot},
                int(now * 1000),
            )
        )
    return drafts


async def run(view: BatteryView, seal: Callable[[Draft], int], interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        for draft in health_drafts(view, time.time(), max_age_s=3 * interval_s):
            with contextlib.suppress(Refused):  # logged and counted by the sealer
                seal(draft)
