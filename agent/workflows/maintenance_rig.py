"""Maintenance rig: a technician plugs a pack in, the agent reads its identity and health, and the
technician confirms what was done (from ``battery-agent confirm`` or a keypad): a service action
becomes a ``maintenance`` event, a replacement in a vehicle a ``replaced`` event."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from battery_trace.agent.battery_view import BatteryView
from battery_trace.agent.decoders.station import StationCommand
from battery_trace.agent.sealer import Draft, Held, Refused
from battery_trace.agent.workflows.gateway import Gateway

log = logging.getLogger(__name__)


class RigError(ValueError):
    """A confirmation that cannot become an event; the message says what is missing."""


class MaintenanceRig(Gateway):
    def __init__(self, view: BatteryView, seal: Callable[[Draft], int], health_interval_s: float, slot: int = 1):
        super().__init__(view, seal, health_interval_s)
        self.slot = slot
        self.counters: Counter[str] = Counter()

    def command(self, cmd: StationCommand) -> int:
        """Seal what the technician confirmed; returns the sequence number, raises RigError or Refused, or
        Held when the outbox cannot be written now (the draft is then kept and sealed later)."""
        state = self.view.slots.get(self.slot)
        if state is None or state.code is None:
            raise RigError(f"no pack with a known code on slot {self.slot}: connect it, or scan its label first")
        source = state.code_source or "manual"
        now = int(time.time() * 1000)
        if cmd.verb == "CONFIRM":
            fields: dict[str, object] = {"code": state.code, "action": cmd.action}
            if cmd.text:
                fields["findings"] = cmd.text
            health = state.health.to_event()
            if health:
                fields["health"] = health
            vin = state.details.get("vin")
            if isinstance(vin, str):
                fields["vin"] = vin
            draft = Draft("maintenance", source, fields, now)
        elif cmd.verb == "REPLACE":
            fields = {"vin": cmd.vin, "code_out": state.code, "code_in": cmd.code}
            if cmd.text:
                fields["reason"] = cmd.text
            draft = Draft("replaced", source, fields, now)
        else:
            raise RigError(f"{cmd.verb} is not a rig command; valid: CONFIRM, REPLACE")
        try:
            seq = self.seal(draft)
        except Held:  # the sealer keeps it until the outbox can take it
            self.counters[f"{draft.type}_held"] += 1
            raise
        except Refused:
            self.counters["refused"] += 1
            raise
        self.counters[f"{draft.type}_sealed"] += 1
        log.info("technician confirmed %s for %s: sealed as seq %d", draft.type, state.code, seq)
        return seq
