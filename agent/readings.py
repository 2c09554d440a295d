"""What decoders produce: typed readings about one battery, from one source, at one moment."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# What a pack can physically report; a value outside is kept as read (it is evidence of a broken sensor,
# wire or firmware) and the snapshot carries the named fault ``implausible_<field>`` next to it.
PLAUSIBLE: dict[str, tuple[float, float]] = {
    "voltage_v": (0.0, 1500.0),
    "soc_pct": (0.0, 100.0),
    "soh_pct": (0.0, 100.0),
    "cell_min_v": (0.5, 5.0),  # 0 V is a dead cell or a broken sense wire, never a healthy one
    "cell_max_v": (0.5, 5.0),
    "cells_v": (0.5, 5.0),
    "temps_c": (-50.0, 150.0),  # -273.1 is an open NTC, not a temperature
}


class DecodeError(ValueError):
    """A frame that could not be decoded. ``reason`` is a short stable name, counted per source."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Health:
    """A partial health reading; None means this source did not say. Current is positive when charging."""

    voltage_v: float | None = None
    current_a: float | None = None
    soc_pct: float | None = None
    soh_pct: float | None = None
    cell_min_v: float | None = None
    cell_max_v: float | None = None
    cells_v: tuple[float, ...] | None = None
    temps_c: tuple[float, ...] | None = None
    cycles: int | None = None
    faults: tuple[str, ...] | None = None
    remaining_ah: float | None = None
    nominal_ah: float | None = None

    def merged(self, newer: Health) -> Health:
        """This reading with every value ``newer`` states replacing the older one."""
        values = {f.name: getattr(newer, f.name) for f in fields(self) if getattr(newer, f.name) is not None}
        return Health(**{**self.present(), **values})

    def present(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def implausible(self) -> tuple[str, ...]:
        """The named faults of values no pack can report (``implausible_soc_pct``...), in field order."""
        found = []
        for name, (low, high) in PLAUSIBLE.items():
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else () if value is None else (value,)
            if any(not low <= v <= high for v in values):
                found.append(f"implausible_{name}")
        return tuple(found)

    def to_event(self) -> dict[str, object]:
        """The fields a ``health`` snapshot carries on the wire (protocol.events.HEALTH_FIELDS): the values
        as read, with a named fault for each one that cannot be true."""
        wire = {k: list(v) if isinstance(v, tuple) else v for k, v in self.present().items()}
        wire.pop("remaining_ah", None)
        wire.pop("nominal_ah", None)
        implausible = [f for f in self.implausible() if f not in (self.faults or ())]
        if implausible:
            wire["faults"] = [*wire.get("faults", []), *implausible]
        return wire


@dataclass(frozen=True)
class Identity:
    """What a source says about who the battery is.

    ``code`` is a GB/T 34014 code when the source carries one; ``secondary`` is a vendor identity of
    this one pack (BRM manufacturer + serial + date) that can be bound to a code once. What every pack of
    a kind shares (a BMS model string) is never a secondary identity: it goes in ``details``.
    """

    source: str
    code: str | None = None
    secondary: str | None = None
    details: dict[str, object] = field(default_factory=dict)


Reading = Health | Identity
