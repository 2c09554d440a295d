"""The lifecycle rules: pure functions from a battery's or a vehicle's events to its state and findings.

A rule violation never rejects a validly signed event; the event is evidence and the violation is a
finding. Rules replay a subject's lifecycle events in the order they happened (device time, then
arrival), so the result does not depend on the order in which messages reached the server: an event
that arrives late is put in its place and the findings are recomputed.

Health snapshots do not change where a battery is, so they are not replayed (they are most of the
traffic); ``after_end_of_life`` is therefore decided by the store over all of a battery's events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

DAY_MS = 86_400_000
FINDING_KINDS = (
    "incomplete_scrapping",
    "double_installation",
    "not_in_vehicle",
    "unauthorised_receiver",
    "unaccounted",
    "late_report",
    "after_end_of_life",
    "invalid_code",
    "chain_break",
    "sequence_gap",
    "revoked_key",  # stored from a key later revoked with effect from before its arrival
    "clock_ahead",  # dated later than it reached the server (beyond a tolerance): the device's clock is wrong
)
# Findings a battery or vehicle replay derives; recomputed (raised or resolved) on every replay.
REPLAYED_BATTERY_KINDS = ("double_installation", "not_in_vehicle", "unauthorised_receiver")
REPLAYED_VEHICLE_KINDS = ("incomplete_scrapping",)

# Working-day deadlines of the 2018 rules, applied as calendar days (configurable).
DEFAULT_DEADLINES_DAYS: dict[str, float] = {
    "installed": 15,
    "maintenance": 30,
    "replaced": 30,
    "vehicle_scrapped": 15,
    "handed_over": 30,
    "repurposed": 15,
    "recycled": 30,
}
# The field a deadline counts from, when the event carries it (else the event's own time).
DEADLINE_FROM = {"installed": "certificate_time", "vehicle_scrapped": "intake_time", "recycled": "intake_time"}

# The fields of an event the rules read (the store keeps them beside each lifecycle event).
RULE_FIELDS = ("code", "vin", "code_out", "code_in", "codes", "to_role", "to_entity", "new_code", "certificate_time",
               "intake_time")  # fmt: skip
OUT_OF_SERVICE = ("removed", "retired")
FINAL = ("recycled", "repurposed")
RETIRED_RECEIVERS = ("recycler", "repurposer")
HOLDER_ROLES = ("manufacturer", "vehicle_maker", "swap_operator", "maintenance", "scrapper", "recycler", "repurposer")


@dataclass(frozen=True)
class EventFacts:
    """What the rules need to know of one stored event. ``time_ms`` is the time the record orders it by:
    the device's time, but never later than the event reached the server (see ``ordering_time``)."""

    kid: bytes
    seq: int
    device: str
    type: str
    time_ms: int
    received_at: float
    fields: Mapping[str, Any]

    @property
    def ref(self) -> tuple[bytes, int]:
        return (self.kid, self.seq)

    def order(self) -> tuple[int, float, bytes, int]:
        return (self.time_ms, self.received_at, self.kid, self.seq)


@dataclass(frozen=True)
class Finding:
    kind: str
    subject: str  # "battery:CODE", "vehicle:VIN" or "device:ID"
    ref: tuple[bytes, int]  # the event that shows it
    detail: str


@dataclass
class BatteryState:
    code: str
    state: str = "unknown"
    vin: str | None = None
    place: str | None = None  # the station or holder where it is when not in a vehicle
    out_of_service_ms: int | None = None
    final_ms: int | None = None
    last_event_ms: int = 0


@dataclass
class VehicleState:
    vin: str
    state: str = "unknown"
    batteries: set[str] = field(default_factory=set)
    last_event_ms: int = 0


def ordering_time(device_time_ms: int, received_at: float) -> int:
    """When an event happened, for the rules: its device time, except that nothing happened after it
    arrived. A clock far ahead (2099) would otherwise sort an event after everything real and pin a
    battery's state for good; the wrong clock itself is a ``clock_ahead`` finding."""
    return min(device_time_ms, int(received_at * 1000))


def clock_ahead(e: EventFacts, device_time_ms: int, tolerance_minutes: float) -> Finding | None:
    ahead_ms = device_time_ms - int(e.received_at * 1000)
    if ahead_ms <= tolerance_minutes * 60_000:
        return None
    stamp = datetime.fromtimestamp(device_time_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    detail = (
        f"seq {e.seq} is dated {stamp}, {ahead_ms / 3_600_000:.1f} h after it reached the server; "
        "the record orders it by its arrival"
    )
    return Finding("clock_ahead", f"device:{e.device}", e.ref, detail)


def battery(code: str) -> str:
    return f"battery:{code}"


def vehicle(vin: str) -> str:
    return f"vehicle:{vin}"


def _in_vehicle(s: BatteryState, vin: str, e: EventFacts, out: list[Finding]) -> None:
    if s.state == "in_vehicle" and s.vin and s.vin != vin:
        out.append(Finding("double_installation", battery(s.code), e.ref, f"installed in {vin} while in {s.vin}"))
    s.state, s.vin, s.place, s.out_of_service_ms = "in_vehicle", vin, None, None


def _out_of_vehicle(s: BatteryState, vin: str, e: EventFacts, out: list[Finding], now: str) -> None:
    if s.state != "unknown" and not (s.state == "in_vehicle" and s.vin == vin):
        where = f"in {s.vin}" if s.state == "in_vehicle" else s.state.replace("_", " ")
        out.append(Finding("not_in_vehicle", battery(s.code), e.ref, f"removed from {vin}; the record has it {where}"))
    s.state, s.vin = now, None


def replay_battery(code: str, events: Iterable[EventFacts]) -> tuple[BatteryState, list[Finding]]:
    """Where the battery is after its lifecycle events, and what was wrong on the way."""
    s = BatteryState(code)
    out: list[Finding] = []
    for e in sorted(events, key=EventFacts.order):
        apply_battery(s, e, out)
    return s, out


def apply_battery(s: BatteryState, e: EventFacts, out: list[Finding]) -> None:
    """One lifecycle event, in its place after every event already applied to ``s``: the replay's step,
    which the store also takes alone when an event arrives in order (so a batch's cost does not grow
    with the battery's history)."""
    code = s.code
    f = e.fields
    s.last_event_ms = max(s.last_event_ms, e.time_ms)
    if e.type == "produced" and f.get("code") == code:
        s.state, s.place = "produced", e.device
    elif e.type == "installed":
        _in_vehicle(s, f["vin"], e, out)
    elif e.type in ("swapped", "replaced"):
        if f.get("code_out") == code:
            _out_of_vehicle(s, f["vin"], e, out, "in_stock" if e.type == "swapped" else "removed")
            s.place = e.device
            if e.type == "replaced":
                s.out_of_service_ms = e.time_ms
        if f.get("code_in") == code:
            _in_vehicle(s, f["vin"], e, out)
    elif e.type == "vehicle_scrapped" and code in f.get("codes", ()):
        s.state, s.vin, s.place, s.out_of_service_ms = "retired", None, e.device, e.time_ms
    elif e.type == "handed_over":
        to_role = f["to_role"]
        allowed = RETIRED_RECEIVERS if s.state in OUT_OF_SERVICE else HOLDER_ROLES
        if to_role not in allowed:
            out.append(
                Finding(
                    "unauthorised_receiver",
                    battery(code),
                    e.ref,
                    f"a {s.state.replace('_', ' ')} battery handed to {f['to_entity']} ({to_role}); "
                    f"may go to: {', '.join(allowed)}",
                )
            )
        s.place = f["to_entity"]
        if s.state in OUT_OF_SERVICE:
            s.out_of_service_ms = e.time_ms  # the new holder's clock starts
    elif e.type == "repurposed":
        if f.get("code") == code:
            s.state, s.final_ms, s.out_of_service_ms = "repurposed", e.time_ms, None
        elif f.get("new_code") == code:
            s.state, s.place, s.out_of_service_ms = "second_life", e.device, None
    elif e.type == "recycled":
        s.state, s.final_ms, s.out_of_service_ms = "recycled", e.time_ms, None


def replay_vehicle(vin: str, events: Iterable[EventFacts]) -> tuple[VehicleState, list[Finding]]:
    """Which batteries are in the vehicle, and whether it was scrapped with all of them."""
    v = VehicleState(vin)
    out: list[Finding] = []
    for e in sorted(events, key=EventFacts.order):
        apply_vehicle(v, e, out)
    return v, out


def apply_vehicle(v: VehicleState, e: EventFacts, out: list[Finding]) -> None:
    """One lifecycle event after every event already applied to ``v`` (see ``apply_battery``)."""
    vin = v.vin
    f = e.fields
    if f.get("vin") == vin:
        v.last_event_ms = max(v.last_event_ms, e.time_ms)
        if e.type == "installed":
            v.batteries.add(f["code"])
            v.state = "built" if v.state == "unknown" else v.state
        elif e.type == "sold":
            v.state = "sold"
        elif e.type in ("swapped", "replaced"):
            # A swap may name one side `unidentified` (its code absent): the record tells only the other.
            v.batteries.discard(f.get("code_out"))
            if "code_in" in f:
                v.batteries.add(f["code_in"])
        elif e.type == "vehicle_scrapped":
            missing = sorted(v.batteries - set(f["codes"]))
            if missing:
                out.append(
                    Finding(
                        "incomplete_scrapping",
                        vehicle(vin),
                        e.ref,
                        f"scrapped without {', '.join(missing)}",
                    )
                )
            v.batteries.clear()
            v.state = "scrapped"


def late_report(e: EventFacts, deadlines_days: Mapping[str, float], subject: str) -> Finding | None:
    """An event that reached the store later than its type's deadline after it happened."""
    days = deadlines_days.get(e.type)
    if days is None:
        return None
    since = e.fields.get(DEADLINE_FROM.get(e.type, ""), e.time_ms)
    delay_ms = e.received_at * 1000 - since
    if delay_ms <= days * DAY_MS:
        return None
    return Finding(
        "late_report", subject, e.ref, f"{e.type} reported {delay_ms / DAY_MS:.1f} days after; limit {days:g}"
    )


def after_end_of_life(code: str, final_ms: int, later: Iterable[tuple[bytes, int, str]]) -> list[Finding]:
    """Events (kid, seq, type) that happened after the battery was recycled."""
    return [
        Finding("after_end_of_life", battery(code), (kid, seq), f"{event_type} after the battery was recycled")
        for kid, seq, event_type in later
    ]


def unaccounted(s: BatteryState, last_ref: tuple[bytes, int], now_ms: int, window_days: float) -> Finding | None:
    """A battery out of service with no event for longer than the window."""
    if s.state not in OUT_OF_SERVICE or s.out_of_service_ms is None:
        return None
    idle_ms = now_ms - max(s.out_of_service_ms, s.last_event_ms)
    if idle_ms <= window_days * DAY_MS:
        return None
    where = f" (last at {s.place})" if s.place else ""
    return Finding(
        "unaccounted", battery(s.code), last_ref, f"{s.state}, no event for {idle_ms / DAY_MS:.0f} days{where}"
    )
