"""An emulated vendor pack that broadcasts its health and its GB/T 34014 code on CAN, as described by
configs/vendor-pack.dbc. The frames are packed here by hand from that layout (``struct``), not with
cantools, so the agent's DBC decoding is checked against an independent encoding."""

from __future__ import annotations

import struct
from dataclasses import dataclass

STATUS_ID, CELLS_ID, IDENTITY_ID = 0x18FF5300, 0x18FF5400, 0x18FF5500


@dataclass
class VendorPack:
    code: str = "0RJPEA00HAU0AAG1C3000555"
    voltage_v: float = 398.2
    discharge_a: float = 35.5  # this vendor's sign: positive while discharging
    soc_pct: float = 71.5
    soh_pct: float = 96.0
    max_temp_c: int = 33
    min_temp_c: int = 29
    max_cell_v: float = 3.342
    min_cell_v: float = 3.318
    cycles: int = 611
    faults: int = 0


def status(p: VendorPack) -> tuple[int, bytes]:
    return STATUS_ID, struct.pack(
        "<HhBBBB",
        round(p.voltage_v * 10),
        round(p.discharge_a * 10),
        round(p.soc_pct * 2),
        round(p.soh_pct * 2),
        p.max_temp_c + 40,
        p.min_temp_c + 40,
    )


def cells(p: VendorPack) -> tuple[int, bytes]:
    return CELLS_ID, struct.pack("<HHHH", round(p.max_cell_v * 1000), round(p.min_cell_v * 1000), p.cycles, p.faults)


def identity(p: VendorPack) -> list[tuple[int, bytes]]:
    text = p.code.encode("ascii").ljust(28, b"\x00")
    return [(IDENTITY_ID, bytes([n]) + text[n * 7 : n * 7 + 7]) for n in range(4)]


def broadcast(p: VendorPack) -> list[tuple[int, bytes]]:
    """One round of what the pack sends: health, then its code in four parts."""
    return [status(p), cells(p), *identity(p)]
