"""Daly BMS UART / RS-485: fixed 13-byte frames both ways, polled.

``A5 addr cmd 08 data[8] sum`` where sum is the low byte of the sum of bytes 0-11. The host sends with
address 0x40 (some tools use 0x80), the BMS answers with 0x01. Multi-frame answers (0x95 cells,
0x96 temperatures, 0x57 battery code) carry their frame number (1-based) in data[0]. The stream
reader resynchronises on 0xA5 and checks every frame's sum. The sign of the current differs between
firmwares; ``charge_positive`` says which one this BMS uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from battery_trace.agent.decoders import framing
from battery_trace.agent.readings import DecodeError, Health, Identity, Reading

START = 0xA5
FRAME_SIZE = 13
HOST_ADDRESS = 0x40
BMS_ADDRESS = 0x01
PACK, CELL_RANGE, TEMP_RANGE, MOS, STATUS, CELLS, TEMPS, ALARMS, CODE = (
    0x90,
    0x91,
    0x92,
    0x93,
    0x94,
    0x95,
    0x96,
    0x98,
    0x57,
)
COMMANDS = {
    PACK: "pack",
    CELL_RANGE: "cell_range",
    TEMP_RANGE: "temperature_range",
    MOS: "mos",
    STATUS: "status",
    CELLS: "cells",
    TEMPS: "temperatures",
    ALARMS: "alarms",
    CODE: "code",
}
MULTI_FRAME = (CELLS, TEMPS, CODE)


def checksum(frame12: bytes) -> int:
    return sum(frame12) & 0xFF


def request(command: int, address: int = HOST_ADDRESS) -> bytes:
    body = bytes([START, address, command, 8]) + bytes(8)
    return body + bytes([checksum(body)])


@dataclass(frozen=True)
class Frame:
    address: int
    command: int
    data: bytes


def _checked(frame: bytes) -> Frame | DecodeError:
    if frame[3] != 8:
        return DecodeError("bad_length", f"length byte {frame[3]}, always 8")
    if checksum(frame[:12]) != frame[12]:
        return DecodeError("bad_checksum", f"sum 0x{frame[12]:02x} != 0x{checksum(frame[:12]):02x}")
    return Frame(frame[1], frame[2], frame[4:12])


def reader() -> framing.FrameReader[Frame]:
    """Splits a byte stream into checked 13-byte frames; yields DecodeError for what it skipped."""
    return framing.FrameReader(START, lambda buf: FRAME_SIZE, _checked)


def _u16(d: bytes, i: int) -> int:
    return d[i] << 8 | d[i + 1]


def decode_frame(frame: Frame, charge_positive: bool = True) -> dict[str, Any]:
    """The fields of one single-frame answer (or one part of a multi-frame one), in SI units."""
    d, c = frame.data, frame.command
    if c == PACK:
        amps = round((_u16(d, 4) - 30000) * 0.1, 1)
        return {
            "voltage_v": round(_u16(d, 0) * 0.1, 1),
            "acquisition_voltage_v": round(_u16(d, 2) * 0.1, 1),
            "current_a": amps if charge_positive else -amps,
            "soc_pct": round(_u16(d, 6) * 0.1, 1),
        }
    if c == CELL_RANGE:
        return {
            "max_cell_voltage_v": _u16(d, 0) / 1000,
            "max_cell": d[2],
            "min_cell_voltage_v": _u16(d, 3) / 1000,
            "min_cell": d[5],
        }
    if c == TEMP_RANGE:
        return {"max_temperature_c": d[0] - 40, "max_sensor": d[1], "min_temperature_c": d[2] - 40, "min_sensor": d[3]}
    if c == MOS:
        state = {0: "idle", 1: "charging", 2: "discharging"}.get(d[0], f"unknown_{d[0]}")
        return {
            "state": state,
            "charge_mos": bool(d[1]),
            "discharge_mos": bool(d[2]),
            "bms_cycles": d[3],
            "remaining_ah": int.from_bytes(d[4:8], "big") / 1000,
        }
    if c == STATUS:
        return {
            "cell_count": d[0],
            "ntc_count": d[1],
            "charger": bool(d[2]),
            "load": bool(d[3]),
            "dio": d[4],
            "cycles": _u16(d, 5),
        }
    if c == CELLS:
        return {"frame": d[0], "cells_mv": [_u16(d, 1 + 2 * i) for i in range(3)]}
    if c == TEMPS:
        return {"frame": d[0], "temperatures_c": [b - 40 for b in d[1:8]]}
    if c == ALARMS:
        return {"alarm_bits": d[0:7].hex(), "fault_code": d[7]}
    if c == CODE:
        return {"frame": d[0], "chars": d[1:8].decode("ascii", errors="replace")}
    raise DecodeError("unknown_command", f"command 0x{c:02x} is not read here; valid: 0x90-0x96, 0x98, 0x57")


def assemble(
    command: int, frames: list[dict[str, Any]], expected: int | None = None, count: int | None = None
) -> dict[str, Any]:
    """Join the parts of a multi-frame answer, in frame order; DecodeError if parts are missing.

    ``count`` is how many cells or probes the board has (its 0x94 status): the last frame is padded
    beyond it (0 mV cells, -40 °C probes), and that padding is no reading. Within the count every value
    stays, a 0 mV cell too: a dead cell is what a technician must see, not a gap.
    """
    numbers = sorted(f["frame"] for f in frames)
    if not numbers or numbers != list(range(1, len(numbers) + 1)) or (expected and len(numbers) < expected):
        raise DecodeError("missing_frames", f"{COMMANDS[command]}: got frames {numbers}, expected 1..{expected or '?'}")
    parts = sorted(frames, key=lambda f: f["frame"])
    if command == CELLS:
        cells = [mv / 1000 for p in parts for mv in p["cells_mv"]]
        return {"cells_v": cells[:count] if count is not None else cells}
    if command == TEMPS:
        temps = [t for p in parts for t in p["temperatures_c"]]
        return {"temperatures_c": temps[:count] if count is not None else temps}
    code = "".join(p["chars"] for p in parts).strip("\x00 \xff")
    return {"code": code}


def readings(command: int, fields: dict[str, Any]) -> list[Reading]:
    if command == PACK:
        return [Health(voltage_v=fields["voltage_v"], current_a=fields["current_a"], soc_pct=fields["soc_pct"])]
    if command == CELL_RANGE:
        return [Health(cell_max_v=fields["max_cell_voltage_v"], cell_min_v=fields["min_cell_voltage_v"])]
    if command == MOS:
        return [Health(remaining_ah=fields["remaining_ah"])]
    if command == STATUS:
        return [Health(cycles=fields["cycles"])]
    if command == CELLS and fields["cells_v"]:
        cells = tuple(fields["cells_v"])
        return [Health(cells_v=cells, cell_min_v=min(cells), cell_max_v=max(cells))]
    if command == TEMPS and fields["temperatures_c"]:
        return [Health(temps_c=tuple(float(t) for t in fields["temperatures_c"]))]
    if command == ALARMS:
        bits = bytes.fromhex(fields["alarm_bits"])
        faults = tuple(f"daly_alarm_{i}_{b}" for i, byte in enumerate(bits) for b in range(8) if byte >> b & 1)
        return [Health(faults=faults)]
    if command == CODE and fields["code"]:
        return [Identity(source="bms", code=fields["code"])]  # the code itself: nothing to bind it to
    return []
