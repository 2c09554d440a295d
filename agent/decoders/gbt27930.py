"""GB/T 27930 (2015 message set; 2011 BRM tolerated): the BMS side of the charger conversation.

Layouts are those of ../shared/reference/protocols.md §2: little-endian, currents 0.1 A/bit with a
-400 A offset (negative = charging), temperatures 1 °C/bit with a -50 °C offset, optional fields
absent when all 0xFF or all 0x00. ``decode`` turns one complete J1939 message into a named message
with fields in SI units; ``readings`` turns that into what the battery view merges. In readings the
current follows the agent's convention (positive while charging), so its sign is flipped here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from battery_trace.agent.decoders.j1939 import Message
from battery_trace.agent.readings import DecodeError, Health, Identity, Reading

BMS_ADDRESS, CHARGER_ADDRESS = 0xF4, 0x56

BATTERY_TYPES = {
    0x01: "lead_acid",
    0x02: "nimh",
    0x03: "lfp",
    0x04: "lmo",
    0x05: "lco",
    0x06: "ternary",
    0x07: "polymer_li_ion",
    0x08: "lto",
    0xFF: "other",
}


@dataclass(frozen=True)
class Decoded:
    name: str
    fields: dict[str, Any]
    source: int = BMS_ADDRESS
    timestamp: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"message": self.name, "source": f"0x{self.source:02x}", "time": round(self.timestamp, 6), **self.fields}


def _u16(d: bytes, i: int) -> int:
    return d[i] | d[i + 1] << 8


def _absent(raw: bytes) -> bool:
    return all(b == 0xFF for b in raw) or all(b == 0 for b in raw)


def _current(raw: int) -> float:
    return round(raw * 0.1 - 400, 1)


def _need(name: str, data: bytes, size: int) -> None:
    if len(data) < size:
        raise DecodeError("short_message", f"{name} needs {size} bytes, got {len(data)}")


def _bhm(d: bytes) -> dict[str, Any]:
    _need("BHM", d, 2)
    return {"max_charge_voltage_v": round(_u16(d, 0) * 0.1, 1)}


def _ascii(raw: bytes) -> str | None:
    if _absent(raw):
        return None
    text = raw.decode("ascii", errors="replace")
    return text if text.isprintable() else None


def _brm(d: bytes) -> dict[str, Any]:
    _need("BRM", d, 8)
    f: dict[str, Any] = {
        "protocol_version": f"{d[1]}.{d[0]}" if d[2] == 0 else d[0:3].hex(),
        "battery_type": BATTERY_TYPES.get(d[3], f"unknown_0x{d[3]:02x}"),
        "rated_capacity_ah": round(_u16(d, 4) * 0.1, 1),
        "rated_voltage_v": round(_u16(d, 6) * 0.1, 1),
        "edition": "2015" if len(d) >= 49 else ("2011" if len(d) >= 41 else "short"),
    }
    if len(d) >= 16:
        f["manufacturer"] = _ascii(d[8:12])
        f["pack_serial"] = None if _absent(d[12:16]) else f"{int.from_bytes(d[12:16], 'little'):08x}"
    if len(d) >= 19 and not _absent(d[16:19]) and 1 <= d[17] <= 12 and 1 <= d[18] <= 31:
        f["production_date"] = f"{1985 + d[16]:04d}-{d[17]:02d}-{d[18]:02d}"
    if len(d) >= 22 and not _absent(d[19:22]):
        f["charge_count"] = int.from_bytes(d[19:22], "little")
    if len(d) >= 23 and d[22] in (0, 1):
        f["ownership"] = ("leased", "vehicle_owned")[d[22]]
    if len(d) >= 41:
        f["vin"] = _ascii(d[24:41])
    if len(d) >= 49 and not _absent(d[41:49]):
        f["bms_software"] = d[41:49].hex()
    return f


def _bcp(d: bytes) -> dict[str, Any]:
    _need("BCP", d, 13)
    return {
        "max_cell_charge_voltage_v": round(_u16(d, 0) * 0.01, 2),
        "max_charge_current_a": _current(_u16(d, 2)),
        "nominal_energy_kwh": round(_u16(d, 4) * 0.1, 1),
        "max_charge_voltage_v": round(_u16(d, 6) * 0.1, 1),
        "max_temperature_c": d[8] - 50,
        "soc_pct": round(_u16(d, 9) * 0.1, 1),
        "voltage_v": round(_u16(d, 11) * 0.1, 1),
    }


def _bcl(d: bytes) -> dict[str, Any]:
    _need("BCL", d, 5)
    return {
        "demand_voltage_v": round(_u16(d, 0) * 0.1, 1),
        "demand_current_a": _current(_u16(d, 2)),
        "mode": {1: "constant_voltage", 2: "constant_current"}.get(d[4], f"unknown_{d[4]}"),
    }


def _bcs(d: bytes) -> dict[str, Any]:
    _need("BCS", d, 9)
    cell = _u16(d, 4)
    return {
        "voltage_v": round(_u16(d, 0) * 0.1, 1),
        "current_a": _current(_u16(d, 2)),
        "max_cell_voltage_v": round((cell & 0x0FFF) * 0.01, 2),
        "max_cell_group": cell >> 12,
        "soc_pct": d[6],
        "remaining_minutes": _u16(d, 7),
    }


_STATUS = ("normal", "high", "low", "untrusted")


def _flags(byte: int, names: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, str]:
    return {name: values[(byte >> (2 * i)) & 0b11] for i, (name, values) in enumerate(names)}


def _bsm(d: bytes) -> dict[str, Any]:
    _need("BSM", d, 7)
    f: dict[str, Any] = {
        "max_cell_number": d[0] + 1,
        "max_temperature_c": d[1] - 50,
        "max_temperature_probe": d[2] + 1,
        "min_temperature_c": d[3] - 50,
        "min_temperature_probe": d[4] + 1,
    }
    level = ("normal", "high", "low", "invalid")
    trust = ("normal", "fault", "untrusted", "invalid")
    f.update(
        _flags(d[5], (("cell_voltage", level), ("soc", level), ("over_current", trust), ("over_temperature", trust)))
    )
    f.update(_flags(d[6], (("insulation", trust), ("output_connector", trust))))
    f["charge_allowed"] = (d[6] >> 4) & 0b11 == 0b01
    return f


def _bmv(d: bytes) -> dict[str, Any]:
    if not d or len(d) % 2:
        raise DecodeError("bad_length", f"BMV carries 2 bytes per cell, got {len(d)}")
    cells = [_u16(d, i) for i in range(0, len(d), 2)]
    return {"cells_v": [round((c & 0x0FFF) * 0.01, 2) for c in cells], "cell_groups": [c >> 12 for c in cells]}


def _bmt(d: bytes) -> dict[str, Any]:
    if not d:
        raise DecodeError("bad_length", "BMT carries no probe")
    return {"temperatures_c": [b - 50 for b in d if b != 0xFF]}


def _bsd(d: bytes) -> dict[str, Any]:
    _need("BSD", d, 7)
    return {
        "soc_pct": d[0],
        "min_cell_voltage_v": round(_u16(d, 1) * 0.01, 2),
        "max_cell_voltage_v": round(_u16(d, 3) * 0.01, 2),
        "min_temperature_c": d[5] - 50,
        "max_temperature_c": d[6] - 50,
    }


def _raw_bits(name: str) -> Callable[[bytes], dict[str, Any]]:
    # BST and BEM are four bytes of reason and timeout bits; their bit assignments are not in the
    # reference this agent is built from, so they are reported as they came, not interpreted.
    def decode(d: bytes) -> dict[str, Any]:
        _need(name, d, 4)
        return {"bits": d[:4].hex()}

    return decode


# PGN -> (name, decoder). Only what the BMS sends; the charger's messages are not about the battery.
MESSAGES: dict[int, tuple[str, Callable[[bytes], dict[str, Any]]]] = {
    0x2700: ("BHM", _bhm),
    0x0200: ("BRM", _brm),
    0x0600: ("BCP", _bcp),
    0x1000: ("BCL", _bcl),
    0x1100: ("BCS", _bcs),
    0x1300: ("BSM", _bsm),
    0x1500: ("BMV", _bmv),
    0x1600: ("BMT", _bmt),
    0x1900: ("BST", _raw_bits("BST")),
    0x1C00: ("BSD", _bsd),
    0x1E00: ("BEM", _raw_bits("BEM")),
}
CHARGER_PGNS = {
    0x2600: "CHM",
    0x0100: "CRM",
    0x0700: "CTS",
    0x0800: "CML",
    0x0900: "CRO",
    0x1200: "CCS",
    0x1A00: "CST",
    0x1D00: "CSD",
    0x1F00: "CEM",
}


def decode(message: Message) -> Decoded | None:
    """The named BMS message, None for charger traffic; DecodeError for a BMS message that is malformed."""
    if message.pgn in CHARGER_PGNS:
        return None
    entry = MESSAGES.get(message.pgn)
    if entry is None:
        raise DecodeError("unknown_pgn", f"PGN 0x{message.pgn:04x} is not a GB/T 27930 BMS message")
    name, decoder = entry
    return Decoded(name, decoder(message.data), message.source, message.timestamp)


def readings(decoded: Decoded) -> list[Reading]:
    """What a decoded message tells the battery view (current positive while charging)."""
    f = decoded.fields
    name = decoded.name
    if name == "BCS":
        return [
            Health(
                voltage_v=f["voltage_v"],
                current_a=-f["current_a"],
                soc_pct=float(f["soc_pct"]),
                cell_max_v=f["max_cell_voltage_v"],
            )
        ]
    if name == "BCP":
        return [Health(voltage_v=f["voltage_v"], soc_pct=f["soc_pct"])]
    if name == "BMV":
        cells = tuple(f["cells_v"])
        return [Health(cells_v=cells, cell_min_v=min(cells), cell_max_v=max(cells))]
    if name == "BMT" and f["temperatures_c"]:
        return [Health(temps_c=tuple(float(t) for t in f["temperatures_c"]))]
    if name == "BSM":
        faults = tuple(
            f"{key}_{value}"
            for key in ("cell_voltage", "soc", "over_current", "over_temperature", "insulation", "output_connector")
            if (value := f[key]) != "normal"
        )
        return [Health(faults=faults)]
    if name == "BSD":
        return [
            Health(soc_pct=float(f["soc_pct"]), cell_min_v=f["min_cell_voltage_v"], cell_max_v=f["max_cell_voltage_v"])
        ]
    if name == "BRM":
        out: list[Reading] = []
        if f.get("charge_count") is not None:
            out.append(Health(cycles=f["charge_count"]))
        key = [f.get("manufacturer"), f.get("pack_serial"), f.get("production_date")]
        if all(key):
            details = {k: f[k] for k in ("battery_type", "rated_capacity_ah", "vin") if f.get(k)}
            out.append(Identity(source="bms", secondary="gbt27930:" + ":".join(key), details=details))  # type: ignore[arg-type]
        return out
    return []
