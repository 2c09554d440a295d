"""Maintenance rig: a technician plugs a pack in, the agent reads its identity and health, and the
technician confirms what was done (from ``battery-agent confirm`` or a keypad): a service action
becomes a ``maintenance`` event, a replacement in a vehicle a ``replaced`` event.

What is sealed must be what the technician saw: a confirmation is refused (and counted) when the pack's
health stopped arriving more than ``HEALTH_FRESH_S`` ago (the BMS lost contact: its last values are not
the pack's state now), when it repeats one already sealed for the same pack on this connection, and
when a replacement names the same pack on both sides.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from battery_trace.agent.battery_view import BatteryView, SlotState
from battery_trace.agent.decoders.station import StationCommand
from battery_trace.agent.sealer import Draft, Held, Refused
from battery_trace.agent.workflows.gateway import Gateway

log = logging.getLogger(__name__)

# Health older than this (monotonic seconds) is not the state of the pack being confirmed. A BMS is
# polled every second or so; ten missed polls is a lost contact, not jitter.
HEALTH_FRESH_S = 10.0


class RigError(ValueError):
    """A confirmation that cannot become an event; the message says what is missing."""


class MaintenanceRig(Gateway):
    def __init__(self, view: BatteryView, seal: Callable[[Draft], int], health_interval_s: float, slot: int = 1):
        super().__init__(view, seal, health_interval_s)
        self.slot = slot
        self.counters: Counter[str] = Counter()
        # What was sealed for the pack now connected, by what the technician said: a repeat is refused.
        self._session: SlotState | None = None
        self._confirmed: dict[tuple[str, ...], int] = {}

    def command(self, cmd: StationCommand) -> int:
        """Seal what the technician confirmed; returns the sequence number, raises RigError or Refused, or
        Held when the outbox cannot be written now (the draft is then kept and sealed later)."""
        state = self.view.slots.get(self.slot)
        if state is None or state.code is None:
            raise RigError(f"no pack with a known code on slot {self.slot}: connect it, or scan its label first")
        if state is not self._session:  # another pack (or the same one plugged in again): a new session
            self._session, self._confirmed = state, {}
        draft, key = self._draft(cmd, state)
        if key in self._confirmed:
            self._refuse(
                "refused_duplicate",
                f"already sealed as seq {self._confirmed[key]} for {state.code}: the same confirmation twice would "
                "record the work twice (if it really was done again, say so in --note)",
            )
        try:
            seq = self.seal(draft)
        except Held:  # the sealer keeps it until the outbox can take it
            self.counters[f"{draft.type}_held"] += 1
            raise
        except Refused:
            self.counters["refused"] += 1
            raise
        self._confirmed[key] = seq
        self.counters[f"{draft.type}_sealed"] += 1
        log.info("technician confirmed %s for %s: sealed as seq %d", draft.type, state.code, seq)
        return seq

    def _draft(self, cmd: StationCommand, state: SlotState) -> tuple[Draft, tuple[str, ...]]:
        """The event and what makes it the same confirmation as another (for a replacement: the packs
        and the vehicle, whatever the note says; a pack is replaced once)."""
        source = state.code_source or "manual"
        now = int(time.time() * 1000)  # the event's time: the wall clock
        if cmd.verb == "CONFIRM":
            fields: dict[str, object] = {"code": state.code, "action": cmd.action}
            if cmd.text:
                fields["findings"] = cmd.text
            health = self._fresh_health(state)
            if health:
                fields["health"] = health
            vin = state.details.get("vin")
            if isinstance(vin, str):
                fields["vin"] = vin
            return Draft("maintenance", source, fields, now), ("CONFIRM", str(cmd.action), cmd.text or "")
        if cmd.verb == "REPLACE":
            if cmd.code == state.code:
                self._refuse(
                    "refused_same_pack",
                    f"{state.code} is the pack connected to the rig: it cannot replace itself; give the code of the "
                    "pack that went into the vehicle",
                )
            fields = {"vin": cmd.vin, "code_out": state.code, "code_in": cmd.code}
            if cmd.text:
                fields["reason"] = cmd.text
            return Draft("replaced", source, fields, now), ("REPLACE", str(cmd.code), str(cmd.vin))
        raise RigError(f"{cmd.verb} is not a rig command; valid: CONFIRM, REPLACE")

    def _fresh_health(self, state: SlotState) -> dict[str, object]:
        age = state.health_age()
        if age is not None and age > HEALTH_FRESH_S:
            self._refuse(
                "refused_stale_health",
                f"the pack's health was last read {age:.0f} s ago (fresh means under {HEALTH_FRESH_S:.0f} s): its "
                "BMS stopped answering; check the cable, wait for a reading, and confirm again",
            )
        return state.health.to_event()

    def _refuse(self, counter: str, why: str) -> None:
        self.counters[counter] += 1
        log.warning("confirmation refused: %s", why)
        raise RigError(why)
