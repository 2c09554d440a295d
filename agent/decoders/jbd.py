"""JBD ("smart BMS", Xiaoxiang) UART protocol: requests, stream framing, and register decoders.

Frames: request ``DD A5 reg len data chk_hi chk_lo 77``; response ``DD reg status len payload chk_hi
chk_lo 77``; checksum ``(0x10000 - sum) & 0xFFFF`` over status + len + payload. Serial input is a byte
stream, so frame boundaries come only from the start byte, the length and the checksum; after garbage
or a truncated frame the stream resynchronises on the next start byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from battery_trace.agent.decoders import framing
from battery_trace.agent.readings import DecodeError, Health, Identity

START, END, READ = 0xDD, 0x77, 0xA5
BASIC, CELLS, MODEL = 0x03, 0x04, 0x05
REGISTERS = (BASIC, CELLS, MODEL)
MAX_PAYLOAD = 255
_HEADER = 4
_TRAILER = 3

PROTECTIONS = (
    "cell_overvoltage",
    "cell_undervoltage",
    "pack_overvoltage",
    "pack_undervoltage",
    "charge_overtemperature",
    "charge_undertemperature",
    "discharge_overtemperature",
    "discharge_undertemperature",
    "charge_overcurrent",
    "discharge_overcurrent",
    "short_circuit",
    "frontend_error",
    "software_lock",
)


def checksum(data: bytes) -> bytes:
    return ((0x10000 - sum(data)) & 0xFFFF).to_bytes(2, "big")


def read_request(register: int) -> bytes:
    """The read command for ``register``; reading never writes to the BMS."""
    body = bytes([register, 0])
    return bytes([START, READ]) + body + checksum(body) + bytes([END])


@dataclass(frozen=True)
class Frame:
    register: int
    status: int
    payload: bytes


def _frame_size(buf: bytearray) -> int | None:
    return _HEADER + buf[3] + _TRAILER if len(buf) >= _HEADER else None


def _checked(frame: bytes) -> Frame | DecodeError:
    return _frame_problem(frame) or Frame(frame[1], frame[2], frame[_HEADER:-_TRAILER])


def reader() -> framing.FrameReader[Frame]:
    """Splits a byte stream into response frames; yields DecodeError for what it had to skip."""
    return framing.FrameReader(START, _frame_size, _checked)


def _frame_problem(frame: bytes) -> DecodeError | None:
    if frame[-1] != END:
        return DecodeError("bad_end", f"frame does not end with 0x77 (got 0x{frame[-1]:02x}): truncated?")
    if frame[1] not in REGISTERS:
        return DecodeError("unknown_register", f"register 0x{frame[1]:02x} is not read here; valid: 0x03-0x05")
    if checksum(frame[2:-3]) != frame[-3:-1]:
        return DecodeError("bad_checksum", f"checksum {frame[-3:-1].hex()} != {checksum(frame[2:-3]).hex()}")
    return None


def decode(frame: Frame) -> Health | Identity:
    if frame.status != 0:
        raise DecodeError("bms_error", f"BMS answered register 0x{frame.register:02x} with status {frame.status}")
    if frame.register == BASIC:
        return decode_basic(frame.payload)
    if frame.register == CELLS:
        return decode_cells(frame.payload)
    return decode_model(frame.payload)


def decode_basic(p: bytes) -> Health:
    if len(p) < 23:
        raise DecodeError("short_payload", f"basic info needs at least 23 bytes, got {len(p)}")
    ntc = p[22]
    if len(p) < 23 + 2 * ntc:
        raise DecodeError("short_payload", f"basic info announces {ntc} probes but has {len(p)} bytes")

    def u16(i: int) -> int:
        return int.from_bytes(p[i : i + 2], "big")

    protection = u16(16)
    temps = tuple(round((u16(23 + 2 * i) - 2731) / 10, 1) for i in range(ntc))
    return Health(
        voltage_v=u16(0) / 100,
        current_a=int.from_bytes(p[2:4], "big", signed=True) / 100,
        remaining_ah=u16(4) / 100,
        nominal_ah=u16(6) / 100,
        cycles=u16(8),
        soc_pct=float(p[19]),
        temps_c=temps,
        faults=tuple(name for bit, name in enumerate(PROTECTIONS) if protection >> bit & 1),
    )


def decode_cells(p: bytes) -> Health:
    if not p or len(p) % 2:
        raise DecodeError("bad_length", f"cell voltages come in 2-byte pairs, got {len(p)} bytes")
    cells = tuple(int.from_bytes(p[i : i + 2], "big") / 1000 for i in range(0, len(p), 2))
    return Health(cells_v=cells, cell_min_v=min(cells), cell_max_v=max(cells))


def decode_model(p: bytes) -> Identity:
    """The BMS's model string: every pack of that model reports it, so it is a detail, never an identity."""
    text = p.decode("ascii", errors="replace").strip("\x00 ")
    if not text or not text.isprintable():
        raise DecodeError("bad_model", f"model string is not printable ASCII: {p!r}")
    return Identity(source="bms", details={"bms_model": text})
