"""An emulated JBD ("smart BMS") on a serial link: answers read requests for registers 0x03-0x05.

Frames follow protocols.md §3: response ``DD reg status len payload chk_hi chk_lo 77`` with the
checksum ``(0x10000 - sum(status, len, payload)) & 0xFFFF``. Faults can be switched on to exercise
the agent: noise between frames, flipped bits, truncated frames and wrong checksums.

Run it on its own:  python -m firmware_stubs.jbd_bms --link /tmp/bms-slot1
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.firmware_stubs.serial_stub import Faults, SerialStub, run_cli


@dataclass
class PackState:
    voltage_v: float = 52.8
    current_a: float = -4.2  # JBD: positive while charging, negative while discharging
    remaining_ah: float = 61.5
    nominal_ah: float = 100.0
    cycles: int = 117
    made: tuple[int, int, int] = (2025, 6, 14)
    soc_pct: int = 62
    cells_mv: list[int] = field(default_factory=lambda: [3301 + (i % 4) for i in range(16)])
    temps_c: list[float] = field(default_factory=lambda: [24.5, 25.1])
    protection: int = 0
    model: str = "JBD-SP16S020-L16S-100A"


def _sum16(data: bytes) -> bytes:
    return struct.pack(">H", (0x10000 - sum(data)) & 0xFFFF)


def response(register: int, payload: bytes, status: int = 0) -> bytes:
    body = bytes([status, len(payload)]) + payload
    return b"\xdd" + bytes([register]) + body + _sum16(body) + b"\x77"


def basic_payload(p: PackState) -> bytes:
    year, month, day = p.made
    date = (year - 2000) << 9 | month << 5 | day
    head = struct.pack(
        ">HhHHHHHHHBBBBB",
        round(p.voltage_v * 100),
        round(p.current_a * 100),
        round(p.remaining_ah * 100),
        round(p.nominal_ah * 100),
        p.cycles,
        date,
        0,
        0,
        p.protection,
        0x10,  # software version 1.0
        p.soc_pct,
        0b11,  # both FETs on
        len(p.cells_mv),
        len(p.temps_c),
    )
    return head + b"".join(struct.pack(">H", round(t * 10) + 2731) for t in p.temps_c)


def cells_payload(p: PackState) -> bytes:
    return b"".join(struct.pack(">H", mv) for mv in p.cells_mv)


class JbdBms(SerialStub):
    """Answers JBD read requests (``DD A5 reg 00 chk chk 77``) arriving on the link."""

    def __init__(self, link: PtyLink, state: PackState | None = None, faults: Faults | None = None, seed: int = 1):
        super().__init__(link, faults, seed)
        self.state = state or PackState()

    def parse_request(self, buf: bytearray) -> tuple[int | None, int]:
        start = buf.find(b"\xdd\xa5")
        if start < 0:
            return None, max(0, len(buf) - 1)
        if len(buf) - start < 7:
            return None, start
        req = bytes(buf[start : start + 7])
        if req[3] == 0 and req[6] == 0x77 and _sum16(req[2:4]) == req[4:6]:
            return req[2], start + 7
        return None, start + 1

    def answer(self, register: int) -> bytes:
        payloads = {
            0x03: lambda: basic_payload(self.state),
            0x04: lambda: cells_payload(self.state),
            0x05: lambda: self.state.model.encode("ascii"),
        }
        if register not in payloads:
            return self.faulty(response(register, b"", status=0x80))
        return self.faulty(response(register, payloads[register]()))

    def change_pack(self, state: PackState, gap_s: float = 1.0) -> None:
        """Another pack is connected to the same cable: silence for ``gap_s`` (the technician's hands),
        then the new pack answers; the serial port itself never closes."""
        self.faults.silent = 1.0
        time.sleep(gap_s)
        self.state = state
        self.faults.silent = 0.0


def main() -> None:
    run_cli("Emulated JBD BMS on a pty (for the agent's serial source).", JbdBms)


if __name__ == "__main__":
    main()
