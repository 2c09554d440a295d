"""Swap station: N slots with their batteries, a PLC announcing vehicles and swaps.

A swap is a transaction the PLC narrates (agent/decoders/station.py): ``VEHICLE <VIN>``, ``OUT
<slot>`` (the battery taken out of the vehicle is now in that slot), ``IN <slot>`` (the battery from
that slot went into the vehicle), ``DONE``. The installed battery's identity and health are taken
when it leaves its slot; the removed one's as soon as its BMS has spoken in its new slot. A finished
swap waits (up to ``identity_wait_s``) for that.

Nothing false is sealed and nothing is lost in silence:
- the bay (the swap in progress and those finishing) is saved in the outbox database after every
  change, so a restart resumes it; a swap already sealed before the restart is not sealed twice;
- a repeated line (a sensor's bounce) is ignored; a second, different ``OUT`` or ``IN``, a slot the
  station does not have, or a vehicle whose VIN was misread spoils the swap, which is then never
  sealed under a VIN or a battery it may not belong to;
- a swap that is not sealed as a whole (abandoned, spoiled, a battery that stayed unknown) is kept as
  local evidence and raises the alarm; when only one battery stayed unknown, the swap is sealed with
  ``unidentified`` naming that side, so the vehicle's side of the record is not lost.
Between swaps the stock reports its health.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from battery_trace.agent.battery_view import BatteryView, weaker
from battery_trace.agent.decoders.station import StationCommand
from battery_trace.agent.outbox import OutboxError
from battery_trace.agent.sealer import Draft, Held, Refused
from battery_trace.agent.workflows.gateway import Gateway

log = logging.getLogger(__name__)

# How much earlier than the PLC's line another source's reading of the same moment may be handled.
SOURCE_SKEW_S = 5.0
# How long a swap that was not sealed as a whole keeps the alarm raised (its evidence is kept for good).
ALARM_WINDOW_S = 24 * 3600.0


@dataclass
class Swap:
    vin: str | None  # None: the VIN was misread, or no VEHICLE line came before this swap's lines
    started_at: float = field(default_factory=time.time)
    slot_out: int | None = None
    slot_in: int | None = None
    code_in: str | None = None
    source_in: str | None = None
    health_in: dict[str, Any] = field(default_factory=dict)
    code_out: str | None = None
    source_out: str | None = None
    health_out: dict[str, Any] = field(default_factory=dict)
    done_at: float | None = None
    spoiled: str | None = None  # why it must not be sealed
    waiting_since: float | None = field(default=None, compare=False)  # monotonic; not saved

    @property
    def time_ms(self) -> int:
        return int((self.done_at or self.started_at) * 1000)

    @property
    def moved(self) -> bool:
        return self.slot_out is not None or self.slot_in is not None

    def to_json(self) -> dict[str, Any]:
        saved = dataclasses.asdict(self)
        del saved["waiting_since"]
        return saved

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> Swap:
        names = {f.name for f in dataclasses.fields(cls)} - {"waiting_since"}
        return cls(**{k: v for k, v in saved.items() if k in names})


class BayStore(Protocol):
    """Where the bay and the evidence of unsealed swaps are kept (the outbox database)."""

    def save_bay(self, state: str) -> None: ...

    def record_evidence(self, at: float, reason: str, swap: str) -> None: ...


class SwapStation(Gateway):
    def __init__(
        self,
        view: BatteryView,
        seal: Callable[[Draft], int],
        health_interval_s: float,
        identity_wait_s: float = 60.0,
        slots: Iterable[int] | None = None,
        store: BayStore | None = None,
        still_held: Callable[[Draft], bool] = lambda draft: False,
    ) -> None:
        super().__init__(view, seal, health_interval_s)
        self.identity_wait_s = identity_wait_s
        self.slots = frozenset(slots) if slots is not None else None  # None: any slot (no config)
        self.store = store
        self.still_held = still_held
        self.current: Swap | None = None
        self.finishing: list[Swap] = []
        self.held: list[tuple[Swap, Draft]] = []  # sealed by the sealer once the outbox can be written
        self.evidence: list[tuple[float, str]] = []  # (time, reason) of swaps not sealed as a whole
        self.counters: Counter[str] = Counter()

    # -- the PLC's lines --------------------------------------------------------------------------

    def command(self, cmd: StationCommand) -> None:
        log.info("PLC: %s", cmd)
        handler = {
            "VEHICLE": self._vehicle,
            "OUT": self._out,
            "IN": self._in,
            "DONE": self._done,
            "ABORT": self._abort,
        }.get(cmd.verb)
        if handler is None:
            self.counters["lines_ignored"] += 1
            log.warning("PLC said %s, which a swap station does not take", cmd.verb)
            return
        handler(cmd)
        self._save()

    def _vehicle(self, cmd: StationCommand) -> None:
        if self.current is not None:
            self._abandon(self.current, f"VEHICLE {cmd.vin or '(unreadable)'} came before its DONE")
        self.current = Swap(cmd.vin)
        if cmd.vin is None:
            self.counters["vehicles_unreadable"] += 1
            self.current.spoiled = f"its VEHICLE line was unreadable ({cmd.text})"
            log.error("PLC: a vehicle came in but its VIN cannot be trusted (%s); its swap is not sealed", cmd.text)

    def _swap_for(self, cmd: StationCommand) -> Swap:
        """The swap this line belongs to; a line with no vehicle in the bay begins one whose VIN is
        unknown, because the batteries move all the same (its VEHICLE line was lost)."""
        if self.current is None:
            self.counters["commands_without_vehicle"] += 1
            log.error("PLC said %s with no vehicle in the bay: a VEHICLE line was lost", cmd.verb)
            self.current = Swap(None, spoiled=f"{cmd.verb} came with no VEHICLE line before it")
        return self.current

    def _slot_line(self, cmd: StationCommand, swap: Swap, taken: int | None) -> bool:
        """True when this OUT/IN line is to be acted on; a bounce is ignored, a conflict spoils the swap."""
        if self.slots is not None and cmd.slot not in self.slots:
            self.counters["bad_slot"] += 1
            valid = ", ".join(map(str, sorted(self.slots)))
            self._spoil(swap, f"{cmd.verb} {cmd.slot}: the station has no slot {cmd.slot} (slots: {valid})")
            return False
        if taken == cmd.slot:
            self.counters["repeated_lines"] += 1
            log.warning("PLC repeated %s %s (a sensor's bounce?); ignored", cmd.verb, cmd.slot)
            return False
        if taken is not None or cmd.slot in (swap.slot_out, swap.slot_in):
            self.counters["conflicting_lines"] += 1
            self._spoil(swap, f"{cmd.verb} {cmd.slot} after OUT {swap.slot_out} / IN {swap.slot_in} in one swap")
            return False
        return True

    @staticmethod
    def _spoil(swap: Swap, why: str) -> None:
        """This swap can no longer be sealed: which battery went where is unknown. The first reason stands."""
        log.error("PLC: %s; the swap of %s will not be sealed", why, swap.vin or "an unknown VIN")
        swap.spoiled = swap.spoiled or why

    def _out(self, cmd: StationCommand) -> None:
        swap = self._swap_for(cmd)
        if not self._slot_line(cmd, swap, swap.slot_out):
            return
        swap.slot_out = cmd.slot
        # Whatever this slot knew from before the vehicle came belongs to an earlier battery. The
        # battery now in it was placed (and scanned, and its BMS heard) before the PLC said OUT, and
        # separate serial and CAN sources may even be handled before the VEHICLE line was.
        self.view.vacate(cmd.slot, arrived_before=swap.started_at - SOURCE_SKEW_S)  # type: ignore[arg-type]

    def _in(self, cmd: StationCommand) -> None:
        swap = self._swap_for(cmd)
        if not self._slot_line(cmd, swap, swap.slot_in):
            return
        swap.slot_in = cmd.slot
        leaving = self.view.slot(cmd.slot)  # type: ignore[arg-type]
        swap.code_in, swap.source_in = leaving.code, leaving.code_source
        swap.health_in = leaving.health.to_event()
        self.view.vacate(cmd.slot)  # type: ignore[arg-type]

    def _abort(self, cmd: StationCommand) -> None:
        self.counters["swaps_aborted"] += 1
        if self.current is not None and self.current.moved:
            log.warning("PLC aborted the swap of %s after batteries moved", self.current.vin)
        self.current = None

    def _done(self, cmd: StationCommand) -> None:
        swap = self.current
        if swap is None:
            self.counters["commands_without_vehicle"] += 1
            log.error("PLC said DONE with no swap in the bay: its lines were lost")
            return
        for side, slot in (("OUT", swap.slot_out), ("IN", swap.slot_in)):
            if slot is None and swap.spoiled is None:
                swap.spoiled = f"DONE came with no {side} line"
        swap.done_at = time.time()
        swap.waiting_since = time.monotonic()
        self.finishing.append(swap)
        self.current = None
        self.tick(time.monotonic())  # durations run on the monotonic clock; done_at is the event's time

    def _abandon(self, swap: Swap, why: str) -> None:
        self.counters["swaps_abandoned"] += 1
        if swap.moved:
            self._observe(swap)
            self._not_sealed(swap, f"abandoned: {why}")
        else:
            log.warning("a vehicle left the bay without a swap (%s)", why)

    # -- finishing ------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        super().tick(now)
        changed = any([self._observe(s) for s in (self.current, *self.finishing) if s is not None])
        for swap in list(self.finishing):
            if self._finished(swap):
                self.finishing.remove(swap)
                self._conclude(swap)
                changed = True
        for entry in list(self.held):
            if not self.still_held(entry[1]):
                self.held.remove(entry)
                changed = True
        if changed:
            self._save()

    def _observe(self, swap: Swap) -> bool:
        """Take the removed battery's identity (once) and health from its new slot; True when it was
        identified just now. Taken as soon as known, and saved, so a restart does not need to hear the
        BMS identify itself again (a GB/T 27930 BMS sends BRM only during its charging handshake)."""
        out = self.view.slots.get(swap.slot_out) if swap.slot_out is not None else None
        if out is None:
            return False
        health = out.health.to_event()
        if health and (swap.code_out is None or out.code == swap.code_out):
            swap.health_out = health
        if swap.code_out is None and out.code:
            swap.code_out, swap.source_out = out.code, out.code_source
            return True
        return False

    def _finished(self, swap: Swap) -> bool:
        if swap.slot_out is None or (swap.code_out is not None and swap.health_out):
            return True
        waiting = time.monotonic() - (swap.waiting_since or time.monotonic())
        return waiting > self.identity_wait_s

    def _conclude(self, swap: Swap) -> None:
        if swap.spoiled is not None:
            self._not_sealed(swap, swap.spoiled)
        elif swap.code_out is not None and swap.code_out == swap.code_in:
            # One pack cannot leave and enter the vehicle at once: a source is stuck on it.
            self.counters["swaps_refused_same_code"] += 1
            self._not_sealed(swap, f"{swap.code_out} is named both removed and installed (a stuck source?)")
        elif swap.code_out is None and swap.code_in is None:
            self._not_sealed(swap, "neither battery was identified")
        else:
            self._seal(swap)

    def _seal(self, swap: Swap) -> None:
        fields: dict[str, Any] = {"vin": swap.vin, "slot_out": swap.slot_out, "slot_in": swap.slot_in}
        known = []
        for side, code, health, source in (
            ("out", swap.code_out, swap.health_out, swap.source_out),
            ("in", swap.code_in, swap.health_in, swap.source_in),
        ):
            if health:
                fields[f"health_{side}"] = health
            if code is None:
                fields["unidentified"] = side
            else:
                fields[f"code_{side}"] = code
                known.append(source)
        # The identity source recorded is the weaker of the two (a binding is weaker than a label).
        source = weaker(*known) if len(known) == 2 else weaker(known[0], known[0])
        draft = Draft("swapped", source, fields, swap.time_ms)
        try:
            self.seal(draft)
        except Held:  # the sealer keeps it until the outbox can take it, and seals it then
            self.counters["swaps_held"] += 1
            self.held.append((swap, draft))
            return
        except Refused as exc:
            self.counters["swaps_refused"] += 1
            self._not_sealed(swap, f"the sealer refused it: {exc}")
            return
        if "unidentified" in fields:
            self.counters["swaps_partial"] += 1
            side = fields["unidentified"]
            battery = "removed" if side == "out" else "installed"
            self._evidence(swap, f"sealed with the {battery} battery (slot {fields[f'slot_{side}']}) unidentified")
        else:
            self.counters["swaps_sealed"] += 1

    def _not_sealed(self, swap: Swap, reason: str) -> None:
        self.counters["swaps_unsealed"] += 1
        self._evidence(swap, f"not sealed: {reason}")

    def _evidence(self, swap: Swap, reason: str) -> None:
        """A swap that is not in the record as a whole: logged, alarmed, and kept on disk as evidence."""
        at = time.time()
        what = f"swap of {swap.vin or 'an unknown VIN'} (OUT {swap.slot_out}, IN {swap.slot_in}) {reason}"
        log.error("%s; kept as local evidence", what)
        self.evidence.append((at, what))
        if self.store is None:
            return
        try:
            self.store.record_evidence(at, what, json.dumps(swap.to_json()))
        except OutboxError as exc:
            log.error("%s; the evidence stays in this log only", exc)

    # -- persistence ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "current": self.current.to_json() if self.current else None,
            "finishing": [s.to_json() for s in self.finishing],
            "held": [s.to_json() for s, _ in self.held],
        }

    def _save(self) -> None:
        if self.store is None:
            return
        try:
            self.store.save_bay(json.dumps(self.state()))
        except OutboxError as exc:  # the sealer alarms on the same disk; the bay goes on in memory
            self.counters["bay_save_errors"] += 1
            log.error("%s; the bay is kept in memory only until it can be saved", exc)

    def restore(self, saved: str | None, sealed: set[tuple[str, int]], evidence: list[tuple[float, str]]) -> None:
        """Resume the bay saved before a restart. ``sealed``: (VIN, time) of swaps in the outbox: one
        sealed just before the restart, whose bay could not be saved after it, is not sealed again."""
        self.evidence = list(evidence)
        if not saved:
            return
        state = json.loads(saved)
        self.current = Swap.from_json(state["current"]) if state.get("current") else None
        now = time.monotonic()
        for item in (*state.get("finishing", ()), *state.get("held", ())):
            swap = Swap.from_json(item)
            if (swap.vin, swap.time_ms) in sealed:
                log.info("the swap of %s was sealed before the restart", swap.vin)
                continue
            swap.waiting_since = now  # the slot gets its full wait again: its BMS may not have spoken yet
            self.finishing.append(swap)
        resumed = len(self.finishing) + (self.current is not None)
        if resumed:
            self.counters["swaps_resumed"] += resumed
            log.warning("resumed the bay after a restart: %s", self.bay())
        self._save()

    # -- what it tells ---------------------------------------------------------------------------------

    @property
    def alarm(self) -> str | None:
        """Swaps not sealed as a whole in the last ALARM_WINDOW_S, or None."""
        recent = [what for at, what in self.evidence if time.time() - at < ALARM_WINDOW_S]
        if not recent:
            return None
        return (
            f"{len(recent)} swap(s) in the last 24 h not sealed as a whole, kept as evidence in the outbox "
            f"(last: {recent[-1]})"
        )

    def bay(self) -> dict[str, object]:
        """The swap in the bay and those waiting for the removed battery's identity, for status."""
        swap = self.current
        return {
            "vehicle": swap.vin if swap else None,
            "slot_out": swap.slot_out if swap else None,
            "slot_in": swap.slot_in if swap else None,
            "finishing": len(self.finishing),
        }
