"""Swap station: N slots with their batteries, a PLC announcing vehicles and swaps.

A swap is a transaction the PLC narrates (agent/decoders/station.py): ``VEHICLE <VIN>``, ``OUT
<slot>`` (the battery taken out of the vehicle is now in that slot), ``IN <slot>`` (the battery from
that slot went into the vehicle), ``DONE``. The installed battery's identity and health are taken
when it leaves its slot; the removed one's once its BMS has spoken in its new slot. A finished swap
waits (up to ``identity_wait_s``) for that; if the removed battery stays unknown, nothing false is
sealed: the swap is counted as incomplete and logged. Between swaps the stock reports its health.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from battery_trace.agent.battery_view import BatteryView, SlotState, weaker
from battery_trace.agent.decoders.station import StationCommand
from battery_trace.agent.sealer import Draft, Held, Refused
from battery_trace.agent.workflows.gateway import Gateway

log = logging.getLogger(__name__)

# How much earlier than the PLC's line another source's reading of the same moment may be handled.
SOURCE_SKEW_S = 5.0


@dataclass
class Swap:
    vin: str
    started_at: float = field(default_factory=time.time)
    slot_out: int | None = None
    slot_in: int | None = None
    code_in: str | None = None
    source_in: str | None = None
    health_in: dict[str, object] = field(default_factory=dict)
    done_at: float | None = None  # wall clock: the event's time
    done_mono: float | None = None  # monotonic: how long it has waited for the removed battery


class SwapStation(Gateway):
    def __init__(
        self,
        view: BatteryView,
        seal: Callable[[Draft], int],
        health_interval_s: float,
        identity_wait_s: float = 60.0,
    ) -> None:
        super().__init__(view, seal, health_interval_s)
        self.identity_wait_s = identity_wait_s
        self.current: Swap | None = None
        self.finishing: list[Swap] = []
        self.counters: Counter[str] = Counter()

    def command(self, cmd: StationCommand) -> None:
        log.info("PLC: %s", cmd)
        if cmd.verb == "VEHICLE":
            if self.current is not None:
                self.counters["swaps_abandoned"] += 1
            self.current = Swap(cmd.vin or "")
            return
        swap = self.current
        if swap is None:
            self.counters["commands_without_vehicle"] += 1
            log.warning("PLC said %s with no vehicle in the bay", cmd.verb)
            return
        if cmd.verb == "OUT" and cmd.slot is not None:
            swap.slot_out = cmd.slot
            # Whatever this slot knew from before the vehicle came belongs to an earlier battery. The
            # battery now in it was placed (and scanned, and its BMS heard) before the PLC said OUT, and
            # separate serial and CAN sources may even be handled before the VEHICLE line was.
            self.view.vacate(cmd.slot, arrived_before=swap.started_at - SOURCE_SKEW_S)
        elif cmd.verb == "IN" and cmd.slot is not None:
            swap.slot_in = cmd.slot
            leaving = self.view.slot(cmd.slot)
            swap.code_in, swap.source_in = leaving.code, leaving.code_source
            swap.health_in = leaving.health.to_event()
            self.view.vacate(cmd.slot)
        elif cmd.verb == "ABORT":
            self.counters["swaps_aborted"] += 1
            self.current = None
        elif cmd.verb == "DONE":
            swap.done_at, swap.done_mono = time.time(), time.monotonic()
            self.finishing.append(swap)
            self.current = None
            self.tick(swap.done_mono)

    def bay(self) -> dict[str, object]:
        """The swap in the bay and those waiting for the removed battery's identity, for status."""
        swap = self.current
        return {
            "vehicle": swap.vin if swap else None,
            "slot_out": swap.slot_out if swap else None,
            "slot_in": swap.slot_in if swap else None,
            "finishing": len(self.finishing),
        }

    def tick(self, now: float) -> None:
        super().tick(now)
        for swap in list(self.finishing):
            out: SlotState | None = self.view.slots.get(swap.slot_out) if swap.slot_out is not None else None
            ready = out is not None and out.code is not None and out.health.to_event()
            if ready and swap.code_in and swap.health_in and swap.slot_in is not None:
                self.finishing.remove(swap)
                self._seal(swap, out)  # type: ignore[arg-type]
            elif swap.done_mono is not None and now - swap.done_mono > self.identity_wait_s:
                self.finishing.remove(swap)
                self.counters["swaps_incomplete"] += 1
                log.error("swap of %s not sealed: the batteries' identity or health stayed unknown", swap.vin)

    def _seal(self, swap: Swap, out: SlotState) -> None:
        if out.code == swap.code_in:  # one pack cannot leave and enter the vehicle: a source is stuck
            self.counters["swaps_refused_same_code"] += 1
            log.error("swap of %s not sealed: %s is named both removed and installed", swap.vin, out.code)
            return
        fields = {
            "vin": swap.vin,
            "code_out": out.code,
            "code_in": swap.code_in,
            "health_out": out.health.to_event(),
            "health_in": swap.health_in,
            "slot_out": swap.slot_out,
            "slot_in": swap.slot_in,
        }
        # The identity source recorded is the weaker of the two: a binding is weaker than a label.
        source = weaker(out.code_source, swap.source_in)
        try:
            self.seal(Draft("swapped", source, fields, int((swap.done_at or time.time()) * 1000)))
            self.counters["swaps_sealed"] += 1
        except Held:  # the sealer keeps it until the outbox can take it, and seals it then
            self.counters["swaps_held"] += 1
        except Refused:
            self.counters["swaps_refused"] += 1
