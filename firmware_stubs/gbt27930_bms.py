"""An emulated GB/T 27930 BMS (and its charger) on a CAN bus: a full charging session.

Frames are built here from ../shared/reference/protocols.md §2 with ``struct``, never with the agent's
decoders. Messages over 8 bytes go through J1939 TP: connection mode (RTS, then packets when the
charger's CTS allows) as GB/T 27930 does, or BAM. Faults for the agent to survive: aborted transfers,
lost and repeated packets, bit flips, and noise frames.
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass, field

BMS, CHARGER = 0xF4, 0x56
PGN = {
    "CHM": 0x2600,
    "BHM": 0x2700,
    "CRM": 0x0100,
    "BRM": 0x0200,
    "BCP": 0x0600,
    "CML": 0x0800,
    "CRO": 0x0900,
    "BRO": 0x0900,
    "BCL": 0x1000,
    "BCS": 0x1100,
    "CCS": 0x1200,
    "BSM": 0x1300,
    "BMV": 0x1500,
    "BMT": 0x1600,
    "BST": 0x1900,
    "BSD": 0x1C00,
    "BEM": 0x1E00,
    "TP_CM": 0xEC00,
    "TP_DT": 0xEB00,
}
PRIORITY = {
    "BHM": 6,
    "BRM": 7,
    "BCP": 7,
    "BCL": 6,
    "BCS": 7,
    "BSM": 6,
    "BMV": 7,
    "BMT": 7,
    "BST": 4,
    "BSD": 6,
    "BEM": 2,
    "CHM": 6,
    "CRM": 6,
    "CML": 6,
    "CRO": 4,
    "CCS": 6,
    "TP_CM": 7,
    "TP_DT": 7,
}


def can_id(name: str, source: int, destination: int) -> int:
    """29-bit J1939 identifier, PDU1: priority | R | DP | PF | PS=destination | SA."""
    pgn = PGN[name]
    return PRIORITY.get(name, 6) << 26 | (pgn >> 8) << 16 | destination << 8 | source


def _current(amps: float) -> int:
    return round((amps + 400) * 10)


@dataclass
class Pack:
    """What the emulated BMS reports; currents negative while charging, as GB/T 27930 has it."""

    manufacturer: str = "CATL"
    serial: int = 0x00012345
    made: tuple[int, int, int] = (2024, 5, 17)
    battery_type: int = 0x03
    rated_ah: float = 150.0
    rated_v: float = 350.4
    charges: int = 256
    vin: str = "LNBSCB3F1PW123456"
    soc_pct: float = 40.0
    voltage_v: float = 352.6
    current_a: float = -120.5
    cells_v: list[float] = field(default_factory=lambda: [3.30 + (i % 5) / 100 for i in range(96)])
    temps_c: list[int] = field(default_factory=lambda: [27, 29, 31, 30])
    edition: str = "2015"


def brm(p: Pack) -> bytes:
    year, month, day = p.made
    body = struct.pack(
        "<3sBHH4sIBBB",
        bytes([1, 1, 0]),
        p.battery_type,
        round(p.rated_ah * 10),
        round(p.rated_v * 10),
        p.manufacturer.encode(),
        p.serial,
        year - 1985,
        month,
        day,
    )
    body += p.charges.to_bytes(3, "little") + bytes([1, 0xFF]) + p.vin.encode()
    return body + (b"\xff" * 8 if p.edition == "2015" else b"")


def bcp(p: Pack) -> bytes:
    return struct.pack(
        "<HHHHBHH", 365, _current(-250.0), 525, 4200, 55 + 50, round(p.soc_pct * 10), round(p.voltage_v * 10)
    )


def bcl(p: Pack) -> bytes:
    return struct.pack("<HHB", 4000, _current(p.current_a), 2)


def bcs(p: Pack) -> bytes:
    top = max(p.cells_v)
    cell = round(top * 100) | (2 << 12)
    remaining = max(0, round((100 - p.soc_pct) * 0.6))
    return struct.pack("<HHHBH", round(p.voltage_v * 10), _current(p.current_a), cell, round(p.soc_pct), remaining)


def bsm(p: Pack) -> bytes:
    hi = max(range(len(p.temps_c)), key=lambda i: p.temps_c[i])
    lo = min(range(len(p.temps_c)), key=lambda i: p.temps_c[i])
    top_cell = max(range(len(p.cells_v)), key=lambda i: p.cells_v[i])
    return bytes([top_cell, p.temps_c[hi] + 50, hi, p.temps_c[lo] + 50, lo, 0x00, 0b1101_0000])


def bmv(p: Pack) -> bytes:
    return b"".join(struct.pack("<H", round(v * 100) | (1 << 12)) for v in p.cells_v)


def bmt(p: Pack) -> bytes:
    return bytes(t + 50 for t in p.temps_c)


def bsd(p: Pack) -> bytes:
    return struct.pack(
        "<BHHBB",
        round(p.soc_pct),
        round(min(p.cells_v) * 100),
        round(max(p.cells_v) * 100),
        min(p.temps_c) + 50,
        max(p.temps_c) + 50,
    )


@dataclass(frozen=True)
class Frame:
    arbitration_id: int
    data: bytes


def segment(
    name: str, payload: bytes, source: int, destination: int, broadcast: bool = False
) -> tuple[Frame, list[Frame]]:
    """(announcement, packets) for a multi-packet message: RTS (or BAM) and its TP.DT packets."""
    pgn = PGN[name]
    packets = math.ceil(len(payload) / 7)
    control = 0x20 if broadcast else 0x10
    to = 0xFF if broadcast else destination
    announce = Frame(
        can_id("TP_CM", source, to),
        struct.pack("<BHBB", control, len(payload), packets, 0xFF) + pgn.to_bytes(3, "little"),
    )
    padded = payload + b"\xff" * (packets * 7 - len(payload))
    dts = [Frame(can_id("TP_DT", source, to), bytes([i + 1]) + padded[i * 7 : i * 7 + 7]) for i in range(packets)]
    return announce, dts


def cts(name: str, packets: int, next_packet: int, source: int = CHARGER, destination: int = BMS) -> Frame:
    return Frame(
        can_id("TP_CM", source, destination),
        bytes([0x11, packets, next_packet, 0xFF, 0xFF]) + PGN[name].to_bytes(3, "little"),
    )


def end_of_message(name: str, size: int, packets: int, source: int = CHARGER, destination: int = BMS) -> Frame:
    return Frame(
        can_id("TP_CM", source, destination),
        struct.pack("<BHBB", 0x13, size, packets, 0xFF) + PGN[name].to_bytes(3, "little"),
    )


def abort(name: str, source: int, destination: int, reason: int = 3) -> Frame:
    return Frame(
        can_id("TP_CM", source, destination), bytes([0xFF, reason, 0xFF, 0xFF, 0xFF]) + PGN[name].to_bytes(3, "little")
    )


def single(name: str, payload: bytes, source: int = BMS, destination: int = CHARGER) -> Frame:
    return Frame(can_id(name, source, destination), payload)


def multi(name: str, payload: bytes, source: int = BMS, destination: int = CHARGER) -> list[Frame]:
    """A message as it goes on the bus: one frame, or RTS / CTS / packets / end-of-message."""
    if len(payload) <= 8:
        return [single(name, payload, source, destination)]
    announce, dts = segment(name, payload, source, destination)
    return [
        announce,
        cts(name, len(dts), 1, destination, source),
        *dts,
        end_of_message(name, len(payload), len(dts), destination, source),
    ]


def handshake(p: Pack) -> list[Frame]:
    """Handshake, identification (BRM: the only message that names the pack) and parameters."""
    out = [single("CHM", b"\x01\x01\x00", CHARGER, BMS), single("BHM", struct.pack("<H", 4200))]
    out += [single("CRM", b"\x00\xff\xff\xff\xff\xff\xff\xff", CHARGER, BMS), *multi("BRM", brm(p))]
    return [*out, single("CRM", b"\xaa\xff\xff\xff\xff\xff\xff\xff", CHARGER, BMS), *multi("BCP", bcp(p))]


def charging_session(p: Pack, rounds: int = 10) -> list[Frame]:
    """Handshake, identification, parameters, charging (SOC rising), and the end of charge."""
    return [*handshake(p), *charging(p, rounds), single("BST", b"\x01\x00\x00\xf0"), single("BSD", bsd(p))]


def charging(p: Pack, rounds: int) -> list[Frame]:
    """The charging phase alone: status and measurements, never the pack's identity. A real BMS stays
    here for hours after one handshake, so a listener that starts meanwhile hears no BRM."""
    out: list[Frame] = []
    for _ in range(rounds):
        out += [
            single("BCL", bcl(p)),
            *multi("BCS", bcs(p)),
            single("BSM", bsm(p)),
            *multi("BMV", bmv(p)),
            single("BMT", bmt(p)),
        ]
        p.soc_pct = min(100.0, p.soc_pct + 2)
        p.voltage_v = round(p.voltage_v + 0.4, 1)
        p.cells_v = [round(v + 0.004, 3) for v in p.cells_v]
    return out


def with_faults(
    frames: list[Frame],
    rng: random.Random,
    lose: float = 0.0,
    repeat: float = 0.0,
    flip: float = 0.0,
    noise: float = 0.0,
) -> list[Frame]:
    """The same traffic as a noisy bus delivers it."""
    out: list[Frame] = []
    for f in frames:
        if rng.random() < noise:
            out.append(Frame(rng.getrandbits(29), bytes(rng.getrandbits(8) for _ in range(rng.randrange(9)))))
        if rng.random() < lose:
            continue
        data = bytearray(f.data)
        if data and rng.random() < flip:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        out.append(Frame(f.arbitration_id, bytes(data)))
        if rng.random() < repeat:
            out.append(Frame(f.arbitration_id, bytes(data)))
    return out
