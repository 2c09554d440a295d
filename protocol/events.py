"""Lifecycle events: the types, the roles that may sign them, their fields, and strict validation.

An event on the wire is one flat CBOR map: the common fields (``v``, ``device``, ``seq``, ``prev``,
``time``, ``type``, ``source``) plus the fields of its type. Unknown fields are refused rather than
ignored: a record that must stand as evidence should not carry data nobody validated.

Battery codes are checked here only for shape (text of sane length). Whether a code follows
GB/T 34014 is a separate question (`code_problems`): the agent refuses to seal a bad code, while the
server keeps a validly signed event and raises a finding, because the signed event is evidence.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from battery_trace.protocol import battery_code, cbor
from battery_trace.protocol.text import control_problem, shown
from battery_trace.protocol.topics import DEVICE_ID_RULE, device_id_problem

SCHEMA_VERSION = 1
HASH_LENGTH = 32
MAX_TEXT = 256
MAX_LIST = 1024
MAX_SEQ = (1 << 63) - 1
# Device clocks before 2020 or after 2100 are wrong clocks, not battery history.
MIN_TIME_MS = 1_577_836_800_000
MAX_TIME_MS = 4_102_444_800_000
ZERO_HASH = bytes(HASH_LENGTH)

ROLES = (
    "manufacturer",
    "vehicle_maker",
    "swap_operator",
    "maintenance",
    "gateway",
    "scrapper",
    "recycler",
    "repurposer",
)

# Where the battery's identity in an event came from.
SOURCES = {
    "label": "a scanned code label (Code 128, QR, Data Matrix)",
    "can": "a vendor CAN frame decoded through a DBC file",
    "bms": "the BMS reported its code (e.g. Daly 0x57)",
    "binding": "a BMS's secondary identity bound earlier to a scanned code",
    "telematics": "the vehicle's GB/T 32960 login",
    "manual": "typed in by a person",
    "file": "submitted from a file by the responsible entity",
}

CHEMISTRY_NAMES = ("lfp", "ncm", "nca", "lmo", "lco", "lto", "nimh", "sodium_ion", "supercapacitor", "other")
BUYER_KINDS = ("individual", "company", "fleet", "rental", "government", "other")
MAINTENANCE_ACTIONS = ("inspection", "repair", "module_replacement", "cell_replacement", "rebalance", "other")
MATERIALS = ("li", "co", "ni", "mn")
SWAP_SIDES = ("out", "in")  # the removed and the installed battery of a swap


class Kind(Enum):
    TEXT = "text"
    INT = "non-negative integer"
    NUMBER = "number"
    CODE = "battery code"
    CODES = "list of battery codes"
    VIN = "VIN"
    TIME = "time (milliseconds since 1970-01-01 UTC)"
    CHOICE = "one of a fixed set"
    HEALTH = "health snapshot"
    MATERIALS = "materials map"


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    required: bool = True
    choices: tuple[str, ...] = ()
    doc: str = ""


@dataclass(frozen=True)
class EventType:
    name: str
    roles: tuple[str, ...]
    fields: tuple[Field, ...]
    doc: str

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)

    @functools.cached_property
    def names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields)


# Roles that hold batteries may hand them over.
HOLDERS = (
    "manufacturer",
    "vehicle_maker",
    "swap_operator",
    "maintenance",
    "scrapper",
    "recycler",
    "repurposer",
)

_HEALTH = Field("health", Kind.HEALTH, doc="health snapshot")

EVENT_TYPES: dict[str, EventType] = {
    t.name: t
    for t in (
        EventType(
            "produced",
            ("manufacturer",),
            (
                Field("code", Kind.CODE),
                Field("chemistry", Kind.CHOICE, choices=CHEMISTRY_NAMES),
                Field("rated_capacity_ah", Kind.NUMBER),
                Field("rated_energy_kwh", Kind.NUMBER),
                Field("children", Kind.CODES, required=False, doc="codes of the modules or cells inside"),
            ),
            "a pack, module or cell was produced",
        ),
        EventType(
            "installed",
            ("vehicle_maker",),
            (
                Field("code", Kind.CODE),
                Field("vin", Kind.VIN),
                Field("certificate_time", Kind.TIME, required=False, doc="the vehicle's certificate date"),
            ),
            "a battery was installed in a vehicle at the factory",
        ),
        EventType(
            "sold",
            ("vehicle_maker",),
            (
                Field("vin", Kind.VIN),
                Field("buyer_kind", Kind.CHOICE, choices=BUYER_KINDS),
                Field("codes", Kind.CODES, required=False, doc="batteries sold with the vehicle"),
            ),
            "a vehicle was sold",
        ),
        EventType(
            "swapped",
            ("swap_operator",),
            (
                Field("vin", Kind.VIN),
                Field("code_out", Kind.CODE, doc="battery taken out of the vehicle"),
                Field("code_in", Kind.CODE, doc="battery put into the vehicle"),
                Field("health_out", Kind.HEALTH),
                Field("health_in", Kind.HEALTH),
                Field("slot_out", Kind.INT, doc="station slot that received the removed battery"),
                Field("slot_in", Kind.INT, doc="station slot the installed battery came from"),
                Field(
                    "unidentified",
                    Kind.CHOICE,
                    required=False,
                    choices=SWAP_SIDES,
                    doc="the side whose battery stayed unknown: its code (and health) are then absent",
                ),
            ),
            "a battery swap at a station",
        ),
        EventType(
            "health",
            ("gateway", "swap_operator", "maintenance"),
            (
                Field("code", Kind.CODE),
                _HEALTH,
                Field("slot", Kind.INT, required=False),
                Field("vin", Kind.VIN, required=False),
            ),
            "a periodic health snapshot",
        ),
        EventType(
            "maintenance",
            ("maintenance",),
            (
                Field("code", Kind.CODE),
                Field("action", Kind.CHOICE, choices=MAINTENANCE_ACTIONS),
                Field("findings", Kind.TEXT, required=False),
                Field("vin", Kind.VIN, required=False),
                Field("health", Kind.HEALTH, required=False),
            ),
            "a battery was serviced",
        ),
        EventType(
            "replaced",
            ("maintenance",),
            (
                Field("vin", Kind.VIN),
                Field("code_out", Kind.CODE),
                Field("code_in", Kind.CODE),
                Field("reason", Kind.TEXT, required=False),
            ),
            "a vehicle's battery was replaced",
        ),
        EventType(
            "vehicle_scrapped",
            ("scrapper",),
            (
                Field("vin", Kind.VIN),
                Field("codes", Kind.CODES, doc="batteries recovered with the vehicle (may be empty)"),
                Field("intake_time", Kind.TIME, required=False),
            ),
            "a vehicle was taken in for scrapping",
        ),
        EventType(
            "handed_over",
            HOLDERS,
            (
                Field("code", Kind.CODE),
                Field("from_entity", Kind.TEXT),
                Field("to_entity", Kind.TEXT),
                Field("to_role", Kind.CHOICE, choices=ROLES),
            ),
            "a battery changed hands",
        ),
        EventType(
            "repurposed",
            ("repurposer",),
            (
                Field("code", Kind.CODE, doc="the original code"),
                Field("new_code", Kind.CODE, doc="the second-life code"),
                Field("application", Kind.TEXT),
            ),
            "a battery entered second-life use under a new code",
        ),
        EventType(
            "recycled",
            ("recycler",),
            (
                Field("code", Kind.CODE),
                Field("mass_kg", Kind.NUMBER),
                Field("materials", Kind.MATERIALS, doc="recovered kg of li, co, ni, mn"),
                Field("intake_time", Kind.TIME, required=False),
            ),
            "a battery's materials were recovered (final)",
        ),
    )
}

HEALTH_FIELDS: dict[str, Kind] = {
    "voltage_v": Kind.NUMBER,
    "current_a": Kind.NUMBER,  # positive = charging
    "soc_pct": Kind.NUMBER,
    "soh_pct": Kind.NUMBER,
    "cell_min_v": Kind.NUMBER,
    "cell_max_v": Kind.NUMBER,
    "cells_v": Kind.NUMBER,  # a list
    "temps_c": Kind.NUMBER,  # a list
    "cycles": Kind.INT,
    "faults": Kind.TEXT,  # a list
}
_HEALTH_LISTS = {"cells_v", "temps_c", "faults"}
_SIGNED_HEALTH = {"current_a", "temps_c"}

COMMON_FIELDS = ("v", "device", "seq", "prev", "time", "type", "source")

_VIN = re.compile(r"[A-HJ-NPR-Z0-9]{17}")
# ISO 3779 / GB 16735: position 9 is a check digit over the transliterated characters and these weights.
_VIN_VALUES = {
    c: v for c, v in zip("ABCDEFGHJKLMNPRSTUVWXYZ", (*range(1, 9), *range(1, 6), 7, 9, *range(2, 10)), strict=True)
}
_VIN_VALUES.update({str(d): d for d in range(10)})
_VIN_WEIGHTS = (8, 7, 6, 5, 4, 3, 2, 10, 0, 9, 8, 7, 6, 5, 4, 3, 2)
# A field or map key a device names is quoted in messages unless it looks like one of the contract's own names.
_PLAIN_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def _name(key: Any) -> str:
    """A device-supplied map key as it appears in an error's path."""
    return key if isinstance(key, str) and _PLAIN_NAME.fullmatch(key) else shown(key)


def roles_for(event_type: str) -> tuple[str, ...]:
    return EVENT_TYPES[event_type].roles


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class EventError(ValueError):
    """An event that does not follow the schema; ``errors`` names each field and what is valid."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_text(path: str, v: Any) -> list[FieldError]:
    if not isinstance(v, str):
        return [FieldError(path, f"must be text, got {type(v).__name__}")]
    if not v.strip():
        return [FieldError(path, "must not be empty")]
    if len(v) > MAX_TEXT:
        return [FieldError(path, f"is {len(v)} characters; at most {MAX_TEXT}")]
    problem = control_problem(v)
    return [FieldError(path, problem)] if problem else []


def _check_code_shape(path: str, v: Any) -> list[FieldError]:
    if not isinstance(v, str):
        return [FieldError(path, f"must be a battery code (text), got {type(v).__name__}")]
    if not 1 <= len(v) <= 64:
        return [FieldError(path, f"is {len(v)} characters; a battery code is 24 (17 second-life)")]
    problem = control_problem(v)
    if problem:
        return [FieldError(path, problem)]
    if v != battery_code.normalise(v):
        return [FieldError(path, "must be normalised (no surrounding spaces, upper case)")]
    return []


def _check_int(path: str, v: Any, low: int = 0, high: int = MAX_SEQ) -> list[FieldError]:
    if not isinstance(v, int) or isinstance(v, bool):
        return [FieldError(path, f"must be an integer, got {type(v).__name__}")]
    if not low <= v <= high:
        return [FieldError(path, f"{v} is out of range; valid: {low}..{high}")]
    return []


def _check_time(path: str, v: Any) -> list[FieldError]:
    errors = _check_int(path, v, MIN_TIME_MS, MAX_TIME_MS)
    if errors and isinstance(v, int) and not isinstance(v, bool):
        return [FieldError(path, f"{v} is not a plausible time in milliseconds (2020..2100)")]
    return errors


_NUMBER_TYPES = frozenset({int, float})


def _all_numbers(items: list[Any] | tuple[Any, ...], signed: bool) -> bool:
    """True when every item is a finite number (non-negative unless ``signed``): loops in C, since a
    snapshot carries dozens of cell readings. bool is not a number here (its type is not int)."""
    return (
        set(map(type, items)) <= _NUMBER_TYPES
        and all(map(math.isfinite, items))
        and (signed or not items or min(items) >= 0)
    )


def _bad_numbers(items: list[Any] | tuple[Any, ...], signed: bool) -> list[int]:
    """Indices of items that are not finite numbers (or are negative where that makes no sense)."""
    return [
        i
        for i, x in enumerate(items)
        if not ((type(x) is float or type(x) is int) and math.isfinite(x) and (signed or x >= 0))
    ]


def _check_health(path: str, v: Any) -> list[FieldError]:
    if not isinstance(v, dict):
        return [FieldError(path, f"must be a map of health values, got {type(v).__name__}")]
    if not v:
        return [FieldError(path, f"must hold at least one of {', '.join(HEALTH_FIELDS)}")]
    errors = []
    for key, value in v.items():
        # The bulk of every snapshot, on the server's hot path: a number or a list of numbers that is
        # fine passes one test here; anything else gets the full check, which names what is wrong.
        if HEALTH_FIELDS.get(key) is Kind.NUMBER:
            if key in _HEALTH_LISTS:
                if type(value) is list and len(value) <= MAX_LIST and _all_numbers(value, key in _SIGNED_HEALTH):
                    continue
            elif (
                (type(value) is float or type(value) is int)
                and math.isfinite(value)
                and (value >= 0 or key in _SIGNED_HEALTH)
            ):
                continue
        # The contract's own names go into the path as they are; only a device's own is quoted.
        name = key if key in HEALTH_FIELDS else _name(key)
        errors.extend(_health_value_errors(f"{path}.{name}", key, value))
    return errors


def _health_value_errors(sub: str, key: Any, value: Any) -> list[FieldError]:
    """Every problem of one health value, each with its path."""
    kind = HEALTH_FIELDS.get(key)
    if kind is None:
        return [FieldError(sub, f"unknown health field; valid: {', '.join(HEALTH_FIELDS)}")]
    is_list = key in _HEALTH_LISTS
    if is_list and (not isinstance(value, list) or len(value) > MAX_LIST):
        return [FieldError(sub, f"must be a list of at most {MAX_LIST} items")]
    items = value if is_list else (value,)
    errors = []
    if kind is Kind.NUMBER:
        for i in _bad_numbers(items, key in _SIGNED_HEALTH):
            item = items[i]
            problem = f"{item} is negative" if _is_number(item) else "must be a finite number"
            errors.append(FieldError(f"{sub}[{i}]" if is_list else sub, problem))
        return errors
    for i, item in enumerate(items):
        where = f"{sub}[{i}]" if is_list else sub
        if kind is Kind.TEXT:
            errors.extend(_check_text(where, item))
        else:
            errors.extend(_check_int(where, item, 0, 10_000_000))
    return errors


def _check_materials(path: str, v: Any) -> list[FieldError]:
    if not isinstance(v, dict):
        return [FieldError(path, f"must be a map of kg per material, got {type(v).__name__}")]
    errors = []
    for key, value in v.items():
        if key not in MATERIALS:
            errors.append(FieldError(f"{path}.{_name(key)}", f"unknown material; valid: {', '.join(MATERIALS)}"))
        elif not _is_number(value) or value < 0:
            errors.append(FieldError(f"{path}.{_name(key)}", "must be a non-negative number of kg"))
    return errors


def _check_field(f: Field, v: Any) -> list[FieldError]:
    path = f.name
    match f.kind:
        case Kind.TEXT:
            return _check_text(path, v)
        case Kind.INT:
            return _check_int(path, v, 0, 1_000_000)
        case Kind.NUMBER:
            if not _is_number(v) or v < 0:
                return [FieldError(path, "must be a finite, non-negative number")]
            return []
        case Kind.CODE:
            return _check_code_shape(path, v)
        case Kind.CODES:
            if not isinstance(v, list) or len(v) > MAX_LIST:
                return [FieldError(path, f"must be a list of at most {MAX_LIST} battery codes")]
            errors = [e for i, c in enumerate(v) for e in _check_code_shape(f"{path}[{i}]", c)]
            if not errors and len(set(v)) != len(v):
                errors.append(FieldError(path, "lists a code more than once"))
            return errors
        case Kind.VIN:
            if not isinstance(v, str) or not _VIN.fullmatch(v):
                return [FieldError(path, "must be a VIN: 17 characters, digits and A-Z without I, O, Q")]
            return []
        case Kind.TIME:
            return _check_time(path, v)
        case Kind.CHOICE:
            if v not in f.choices:
                return [FieldError(path, f"{shown(v)} is not valid; valid: {', '.join(f.choices)}")]
            return []
        case Kind.HEALTH:
            return _check_health(path, v)
        case Kind.MATERIALS:
            return _check_materials(path, v)
    raise AssertionError(f"unhandled kind {f.kind}")  # pragma: no cover - every Kind is matched above


def body_errors(event_type: Any, source: Any, fields: Mapping[str, Any]) -> list[FieldError]:
    """Validate what a device decides (type, identity source, type fields) before anything is sealed."""
    if event_type not in EVENT_TYPES:
        return [FieldError("type", f"{shown(event_type)} is not an event type; valid: {', '.join(EVENT_TYPES)}")]
    spec = EVENT_TYPES[event_type]
    errors = []
    if source not in SOURCES:
        errors.append(FieldError("source", f"{shown(source)} is not valid; valid: {', '.join(SOURCES)}"))
    names = spec.names
    for name in fields:
        if name not in names:
            valid = ", ".join(f.name for f in spec.fields)
            errors.append(FieldError(_name(name), f"is not a field of {event_type!r}; valid: {valid}"))
    unknown = _unidentified(event_type, fields)
    for f in spec.fields:
        if f.name in unknown:
            if f.kind is Kind.CODE and f.name in fields:
                errors.append(FieldError(f.name, f"must be absent: unidentified = {fields['unidentified']!r}"))
            elif f.name in fields:
                errors.extend(_check_field(f, fields[f.name]))
            continue
        if f.name not in fields:
            if f.required:
                errors.append(FieldError(f.name, f"is required for {event_type!r} ({f.kind.value})"))
            continue
        errors.extend(_check_field(f, fields[f.name]))
    return errors


def _unidentified(event_type: str, fields: Mapping[str, Any]) -> frozenset[str]:
    """Fields a swap may leave out because it names their side as unidentified (schema 1, additive): the
    unknown battery's code must be absent, its health may be. The vehicle's side of the record is kept."""
    side = fields.get("unidentified") if event_type == "swapped" else None
    return frozenset((f"code_{side}", f"health_{side}")) if side in SWAP_SIDES else frozenset()


@dataclass(frozen=True)
class Event:
    device: str
    seq: int
    prev: bytes
    time_ms: int
    type: str
    source: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    v: int = SCHEMA_VERSION

    def to_map(self) -> dict[str, Any]:
        common = {
            "v": self.v,
            "device": self.device,
            "seq": self.seq,
            "prev": self.prev,
            "time": self.time_ms,
            "type": self.type,
            "source": self.source,
        }
        return {**common, **self.fields}

    def codes(self) -> tuple[tuple[str, str], ...]:
        """(field path, code) for every battery code the event names."""
        return self._codes

    @functools.cached_property
    def _codes(self) -> tuple[tuple[str, str], ...]:
        found = []
        for f in EVENT_TYPES[self.type].fields:
            value = self.fields.get(f.name)
            if f.kind is Kind.CODE and isinstance(value, str):
                found.append((f.name, value))
            elif f.kind is Kind.CODES and isinstance(value, list):
                found.extend((f"{f.name}[{i}]", code) for i, code in enumerate(value))
        return tuple(found)

    def to_json(self) -> dict[str, Any]:
        m = self.to_map()
        m["prev"] = self.prev.hex()
        return m


def event_errors(m: Any) -> list[FieldError]:
    """Every schema problem in a decoded event map (empty when it is a valid event)."""
    if not isinstance(m, dict):
        return [FieldError("$", f"an event is a map, got {type(m).__name__}")]
    errors = []
    if m.get("v") != SCHEMA_VERSION:
        errors.append(FieldError("v", f"schema version {shown(m.get('v'))} is not supported; valid: {SCHEMA_VERSION}"))
    device = m.get("device")
    problem = device_id_problem(device) if isinstance(device, str) else f"must be text ({DEVICE_ID_RULE})"
    if problem:
        errors.append(FieldError("device", problem))
    errors.extend(_check_int("seq", m.get("seq"), 1, MAX_SEQ))
    prev = m.get("prev")
    if not isinstance(prev, bytes) or len(prev) != HASH_LENGTH:
        errors.append(FieldError("prev", f"must be {HASH_LENGTH} bytes (SHA-256 of the previous envelope)"))
    elif m.get("seq") == 1 and prev != ZERO_HASH:
        errors.append(FieldError("prev", "must be all zeros for the first event (seq 1)"))
    errors.extend(_check_time("time", m.get("time")))
    for name in ("type", "source"):
        if name not in m:
            errors.append(FieldError(name, "is required"))
    fields = {k: v for k, v in m.items() if k not in COMMON_FIELDS}
    errors.extend(body_errors(m.get("type"), m.get("source"), fields))
    return errors


def from_map(m: Any) -> Event:
    errors = event_errors(m)
    if errors:
        raise EventError(errors)
    fields = {k: v for k, v in m.items() if k not in COMMON_FIELDS}
    return Event(m["device"], m["seq"], m["prev"], m["time"], m["type"], m["source"], fields, m["v"])


def encode(event: Event) -> bytes:
    """Deterministic CBOR of a valid event (raises EventError if it is not valid)."""
    m = event.to_map()
    errors = event_errors(m)
    if errors:
        raise EventError(errors)
    return cbor.encode(m)


def decode(payload: bytes) -> Event:
    """Strictly decode an event payload: deterministic CBOR, no duplicate keys, a valid schema."""
    try:
        m = cbor.decode(payload, deterministic=True)
    except cbor.CborError as exc:
        raise EventError([FieldError("$", str(exc))]) from None
    return from_map(m)


def vin_check_digit(vin: str) -> str:
    """The check digit position 9 of ``vin`` (17 VIN characters) must carry: 0-9, or X for ten."""
    remainder = sum(_VIN_VALUES[c] * w for c, w in zip(vin, _VIN_WEIGHTS, strict=True)) % 11
    return "X" if remainder == 10 else str(remainder)


def with_check_digit(vin: str) -> str:
    """``vin`` with the check digit its other characters make (for examples, demos and tests)."""
    return vin[:8] + vin_check_digit(vin) + vin[9:]


# Where position 9 must be the check digit: VINs of vehicles made for China (GB 16735, world
# manufacturer identifiers starting with L) and North America (1-5). Elsewhere (most European makers)
# position 9 is the maker's own, so a "wrong" check digit there is no misreading.
_CHECK_DIGIT_REGIONS = frozenset("L12345")


def vin_problem(vin: str) -> str | None:
    """Why ``vin`` is not a VIN (shape, or the check digit where ISO 3779 / GB 16735 require it), or None."""
    if not _VIN.fullmatch(vin):
        return "must be a VIN: 17 characters, digits and A-Z without I, O, Q"
    if vin[0] not in _CHECK_DIGIT_REGIONS:
        return None
    digit = vin_check_digit(vin)
    if vin[8] != digit:
        return f"check digit (position 9) is {vin[8]!r}, the other characters make it {digit!r}: a misread VIN"
    return None


def vin_problems(event: Event) -> list[FieldError]:
    """VINs in the event whose check digit is wrong: the agent refuses to seal them (the server, which
    keeps a validly signed event as evidence, does not refuse them for it)."""
    vin = event.fields.get("vin")
    problem = vin_problem(vin) if isinstance(vin, str) and _VIN.fullmatch(vin) else None
    return [FieldError("vin", problem)] if problem else []


def code_problems(event: Event) -> list[FieldError]:
    """Codes in the event that break GB/T 34014 (a finding on the server, a refusal to seal on the agent)."""
    problems = []
    for path, code in event.codes():
        try:
            battery_code.parse(code)
        except battery_code.CodeError as exc:
            problems.append(FieldError(path, str(exc)))
    return problems
