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

Any line may end in ``*HH``: two hex digits, the XOR of every byte before the ``*`` (as NMEA 0183
does). A line whose checksum does not match was garbled on the wire and is dropped (``bad_checksum``),
never acted on. A VIN is checked by its check digit (ISO 3779 / GB 16735, position 9): a ``VEHICLE``
line whose VIN is misread still says a vehicle came in, so it becomes a command with ``vin=None`` and
the workflow keeps that vehicle's lines apart from every other's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from battery_trace.agent.readings import DecodeError
from battery_trace.protocol.battery_code import normalise
from battery_trace.protocol.events import MAINTENANCE_ACTIONS, vin_problem

_CHECKSUM = re.compile(r"(.*)\*([0-9A-Fa-f]{2})\s*")


@dataclass(frozen=True)
class StationCommand:
    verb: str
    vin: str | None = None
    slot: int | None = None
    action: str | None = None
    text: str | None = None
    code: str | None = None


def checksum(text: str) -> str:
    """The ``*HH`` a line's text must end with: the XOR of its bytes, in two upper-case hex digits."""
    value = 0
    for byte in text.encode("ascii", errors="replace"):
        value ^= byte
    return f"{value:02X}"


def _verified(line: str) -> str | DecodeError:
    """The line without its checksum, or why it must not be acted on."""
    match = _CHECKSUM.fullmatch(line)
    if match is None:
        return line
    text, given = match.groups()
    if checksum(text) != given.upper():
        return DecodeError("bad_checksum", f"{line.strip()[:60]!r}: checksum {given}, the text makes {checksum(text)}")
    return text


def _vehicle(words: list[str]) -> StationCommand:
    """A vehicle came in; ``vin`` is None (and ``text`` says why) when its VIN cannot be trusted."""
    if len(words) != 1:
        return StationCommand("VEHICLE", text=f"needs one VIN, got {len(words)} words")
    problem = vin_problem(words[0].upper())
    if problem:
        return StationCommand("VEHICLE", text=f"{words[0][:20]!r}: {problem}")
    return StationCommand("VEHICLE", vin=words[0].upper())


def parse(line: str) -> StationCommand | DecodeError:
    verified = _verified(line)
    if isinstance(verified, DecodeError):
        return verified
    words = verified.split()
    if not words:
        return DecodeError("empty", "a blank line is not a command")
    verb = words[0].upper()
    rest = words[1:]
    if verb == "VEHICLE":
        return _vehicle(rest)
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
        vin = rest[1].strip().upper()
        problem = vin_problem(vin)
        if problem:
            return DecodeError("bad_vin", f"{rest[1][:20]!r}: {problem}")
        return StationCommand(verb, code=normalise(rest[0]), vin=vin, text=" ".join(rest[2:]) or None)
    return DecodeError("bad_command", f"{line.strip()[:60]!r}; valid: VEHICLE, OUT, IN, DONE, ABORT, CONFIRM, REPLACE")
