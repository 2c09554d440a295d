"""Commands from a swap station's PLC and from a maintenance technician's keypad, one per line.

This is battery-trace's own line protocol for integrators (docs/integrator-guide.md), deliberately
plain so a PLC can print it:

    VEHICLE <VIN>        a vehicle entered the swap bay
    OUT <slot>           the battery taken out of the vehicle was put in <slot>
    IN <slot>            the battery in <slot> was installed in the vehicle
    DONE                 the swap is complete
    ABORT                the swap was abandoned

and for a maintenance rig's keypad (or ``battery-agent confirm``):

    CONFIRM <action> [findings...]        the technician confirms a service action
    REPLACE <new code> <VIN> [reason...]  the pack was replaced in the vehicle by another
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from battery_trace.agent.readings import DecodeError
from battery_trace.protocol.battery_code import normalise
from battery_trace.protocol.events import MAINTENANCE_ACTIONS

_VIN = re.compile(r"[A-HJ-NPR-Z0-9]{17}")


@dataclass(frozen=True)
class StationCommand:
    verb: str
    vin: str | None = None
    slot: int | None = None
    action: str | None = None
    text: str | None = None
    code: str | None = None


def _vin(word: str) -> str | None:
    vin = word.strip().upper()
    return vin if _VIN.fullmatch(vin) else None


def parse(line: str) -> StationCommand | DecodeError:
    words = line.split()
    if not words:
        return DecodeError("empty", "a blank line is not a command")
    verb = words[0].upper()
    rest = words[1:]
    if verb == "VEHICLE" and len(rest) == 1:
        vin = _vin(rest[0])
        return StationCommand(verb, vin=vin) if vin else DecodeError("bad_vin", f"{rest[0]!r} is not a VIN")
    if verb in ("OUT", "IN") and len(rest) == 1:
        if rest[0].isdigit():
            return StationCommand(verb, slot=int(rest[0]))
        return DecodeError("bad_slot", f"{verb} needs a slot number, got {rest[0]!r}")
    if verb in ("DONE", "ABORT") and not rest:
        return StationCommand(verb)
    if verb == "CONFIRM" and rest:
        action = rest[0].lower()
        if action not in MAINTENANCE_ACTIONS:
            return DecodeError("bad_action", f"{action!r}; valid: {', '.join(MAINTENANCE_ACTIONS)}")
        return StationCommand(verb, action=action, text=" ".join(rest[1:]) or None)
    if verb == "REPLACE" and len(rest) >= 2:
        vin = _vin(rest[1])
        if not vin:
            return DecodeError("bad_vin", f"{rest[1]!r} is not a VIN")
        return StationCommand(verb, code=normalise(rest[0]), vin=vin, text=" ".join(rest[2:]) or None)
    return DecodeError("bad_command", f"{line.strip()[:60]!r}; valid: VEHICLE, OUT, IN, DONE, ABORT, CONFIRM, REPLACE")
