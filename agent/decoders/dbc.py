"""DBC-driven CAN decoding: any vendor's DBC file plus a mapping, in the agent config, from its
signals to reading fields.

cantools decodes the frames (scaling, signedness, multiplexing); the mapping says which signal is
which health value, and which signals carry the battery's 24-character code. A code that is spread
over several frames, one part per frame (a part index signal, or multiplexed text signals), is
assembled here until all its characters have arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cantools
from battery_trace.agent.decoders.j1939 import CanFrame
from battery_trace.agent.readings import DecodeError, Health, Identity, Reading

HEALTH_FIELDS = (
    "voltage_v",
    "current_a",
    "soc_pct",
    "soh_pct",
    "cell_min_v",
    "cell_max_v",
    "cycles",
    "temp_max_c",
    "temp_min_c",
)


class DbcError(ValueError):
    """A DBC file or mapping that cannot work; the message names the file, message or signal."""


@dataclass(frozen=True)
class CodeMapping:
    message: str
    part: str  # the signal that says which part of the code this frame carries (0-based)
    text: tuple[str, ...]  # signals holding ASCII characters, little-endian
    chars_per_signal: int
    length: int = 24


@dataclass(frozen=True)
class DbcMapping:
    health: dict[str, str] = field(default_factory=dict)  # reading field -> "Message.Signal"
    code: CodeMapping | None = None
    charge_positive: bool = True  # False when the DBC's current is positive while discharging
    faults: str | None = None  # "Message.Signal" of a bit field; each set bit becomes a fault


def load(path: Path, mapping: DbcMapping) -> cantools.database.Database:
    """Load a DBC file and check that every signal the mapping names exists in it."""
    try:
        db = cantools.database.load_file(str(path), database_format="dbc", strict=True)
    except (OSError, cantools.database.UnsupportedDatabaseFormatError, ValueError) as exc:
        raise DbcError(f"{path}: not a DBC file cantools can read ({str(exc).splitlines()[0]})") from None
    named = {f"{m.name}.{s.name}" for m in db.messages for s in m.signals}
    wanted = list(mapping.health.values()) + ([mapping.faults] if mapping.faults else [])
    if mapping.code:
        wanted += [f"{mapping.code.message}.{s}" for s in (mapping.code.part, *mapping.code.text)]
    missing = [w for w in wanted if w not in named]
    if missing:
        raise DbcError(f"{path}: no signal {missing[0]!r}; signals there: {', '.join(sorted(named))}")
    return db


class DbcDecoder:
    def __init__(self, db: cantools.database.Database, mapping: DbcMapping) -> None:
        self.db = db
        self.mapping = mapping
        self._parts: dict[int, str] = {}

    def decode(self, frame: CanFrame) -> tuple[str, dict[str, Any]] | None:
        """(message name, signal values) for a frame the DBC knows; None for one it does not."""
        try:
            message = self.db.get_message_by_frame_id(frame.arbitration_id)
        except KeyError:
            return None
        try:
            values = message.decode(frame.data, decode_choices=False, scaling=True, allow_truncated=False)
        except (cantools.database.DecodeError, ValueError, KeyError) as exc:
            raise DecodeError("bad_frame", f"{message.name}: {exc}") from None
        return message.name, dict(values)

    def readings(self, name: str, values: dict[str, Any]) -> list[Reading]:
        out: list[Reading] = []
        health: dict[str, Any] = {}
        temps: list[float] = []
        for reading_field, ref in self.mapping.health.items():
            message, signal = ref.split(".", 1)
            if message != name or signal not in values:
                continue
            value = float(values[signal])
            if reading_field == "current_a" and not self.mapping.charge_positive:
                value = -value
            if reading_field in ("temp_max_c", "temp_min_c"):
                temps.append(value)
            elif reading_field == "cycles":
                health["cycles"] = int(value)
            else:
                health[reading_field] = round(value, 4)
        if temps:
            health["temps_c"] = tuple(temps)
        if self.mapping.faults and self.mapping.faults.split(".", 1)[0] == name:
            bits = int(values[self.mapping.faults.split(".", 1)[1]])
            health["faults"] = tuple(f"dbc_fault_{b}" for b in range(bits.bit_length()) if bits >> b & 1)
        if health:
            out.append(Health(**health))
        code = self._code(name, values)
        if code is not None:
            out.append(Identity(source="can", code=code))
        return out

    def _code(self, name: str, values: dict[str, Any]) -> str | None:
        c = self.mapping.code
        if c is None or name != c.message or c.part not in values:
            return None
        part = int(values[c.part])
        text = b"".join(int(values[s]).to_bytes(c.chars_per_signal, "little") for s in c.text if s in values)
        if part == 0:
            self._parts.clear()  # a new round of the code begins
        self._parts[part] = text.decode("ascii", errors="replace")
        joined = "".join(self._parts.get(i, "") for i in range(len(self._parts)))
        if len(self._parts) == max(self._parts) + 1 and len(joined) >= c.length:
            self._parts.clear()
            return joined[: c.length].strip("\x00 ")
        return None
