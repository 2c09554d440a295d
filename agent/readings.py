"""What decoders produce: typed readings about one battery, from one source, at one moment."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


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

    def to_event(self) -> dict[str, object]:
        """The fields a ``health`` snapshot carries on the wire (protocol.events.HEALTH_FIELDS)."""
        wire = {k: list(v) if isinstance(v, tuple) else v for k, v in self.present().items()}
        wire.pop("remaining_ah", None)
        wire.pop("nominal_ah", None)
        return wire


@dataclass(frozen=True)
class Identity:
    """What a source says about who the battery is.

    ``code`` is a GB/T 34014 code when the source carries one; ``secondary`` is a vendor identity
    (a BMS model string, BRM manufacturer + serial) that can be bound to a code once.
    """

    source: str
    code: str | None = None
    secondary: str | None = None
    details: dict[str, object] = field(default_factory=dict)


Reading = Health | Identity
