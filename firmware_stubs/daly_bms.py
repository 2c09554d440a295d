"""An emulated Daly BMS on a serial link: answers 0x90-0x96, 0x98 and 0x57 requests.

Frames follow protocols.md §4: 13 bytes, ``A5 01 cmd 08 data[8] sum``; multi-frame answers (cells,
temperatures, the battery code) carry their frame number in data[0]. Built here with ``struct``,
never with the agent's decoder. Faults: noise, flipped bits, truncation, wrong sums, silence, and
another pack on the same cable (``change_pack``).

Run it on its own:  python -m firmware_stubs.daly_bms --link /tmp/daly-slot2
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.firmware_stubs.serial_stub import Faults, SerialStub, run_cli


@dataclass
class DalyPack:
    voltage_v: float = 76.4
    current_a: float = 11.3  # in this firmware's convention: raw = 30000 + 10 x A
    soc_pct: float = 55.0
    cells_mv: list[int] = field(default_factory=lambda: [3301 + (i % 6) for i in range(20)])
    temps_c: list[int] = field(default_factory=lambda: [24, 25, 26])
    cycles: int = 88
    remaining_mah: int = 55_000
    alarm: bytes = bytes(7)
    code: str = "0RJPBA00HAU0AAG1C3000777"


def frame(command: int, data: bytes) -> bytes:
    head = bytes([0xA5, 0x01, command, 8]) + data.ljust(8, b"\x00")[:8]
    return head + bytes([sum(head) & 0xFF])


def answers(command: int, p: DalyPack) -> list[bytes]:
    if command == 0x90:
        return [
            frame(
                0x90,
                struct.pack(
                    ">HHHH", round(p.voltage_v * 10), 0, 30000 + round(p.current_a * 10), round(p.soc_pct * 10)
                ),
            )
        ]
    if command == 0x91:
        hi = max(range(len(p.cells_mv)), key=lambda i: p.cells_mv[i])
        lo = min(range(len(p.cells_mv)), key=lambda i: p.cells_mv[i])
        return [frame(0x91, struct.pack(">HBHB", p.cells_mv[hi], hi + 1, p.cells_mv[lo], lo + 1))]
    if command == 0x92:
        return [frame(0x92, bytes([max(p.temps_c) + 40, 1, min(p.temps_c) + 40, 2]))]
    if command == 0x93:
        return [frame(0x93, bytes([2, 1, 1, p.cycles & 0xFF]) + struct.pack(">I", p.remaining_mah))]
    if command == 0x94:
        return [frame(0x94, bytes([len(p.cells_mv), len(p.temps_c), 0, 1, 0]) + struct.pack(">H", p.cycles))]
    if command == 0x95:
        cells = p.cells_mv + [0] * (-len(p.cells_mv) % 3)
        return [
            frame(0x95, bytes([n + 1]) + struct.pack(">HHH", *cells[n * 3 : n * 3 + 3])) for n in range(len(cells) // 3)
        ]
    if command == 0x96:
        temps = p.temps_c + [-40] * (-len(p.temps_c) % 7)
        return [
            frame(0x96, bytes([n + 1]) + bytes(t + 40 for t in temps[n * 7 : n * 7 + 7]))
            for n in range(len(temps) // 7)
        ]
    if command == 0x98:
        return [frame(0x98, p.alarm + b"\x00")]
    if command == 0x57:
        text = p.code.encode().ljust(-(-len(p.code) // 7) * 7, b"\x00")
        return [frame(0x57, bytes([n + 1]) + text[n * 7 : n * 7 + 7]) for n in range(len(text) // 7)]
    return []


class DalyBms(SerialStub):
    """Answers Daly requests (``A5 40|80 cmd 08 ... sum``) arriving on the link."""

    def __init__(self, link: PtyLink, pack: DalyPack | None = None, faults: Faults | None = None, seed: int = 1):
        super().__init__(link, faults, seed)
        self.pack = pack or DalyPack()

    def parse_request(self, buf: bytearray) -> tuple[int | None, int]:
        start = buf.find(b"\xa5")
        if start < 0:
            return None, len(buf)
        if len(buf) - start < 13:
            return None, start
        req = bytes(buf[start : start + 13])
        if req[1] in (0x40, 0x80) and req[3] == 8 and sum(req[:12]) & 0xFF == req[12]:
            return req[2], start + 13
        return None, start + 1

    def answer(self, command: int) -> bytes:
        return b"".join(self.faulty(a) for a in answers(command, self.pack))

    def change_pack(self, pack: DalyPack, gap_s: float = 1.0) -> None:
        """Another pack is connected to the same cable: silence for ``gap_s`` (the technician's hands),
        then the new pack answers; the serial port itself never closes."""
        self.faults.silent = 1.0
        time.sleep(gap_s)
        self.pack = pack
        self.faults.silent = 0.0


def main() -> None:
    run_cli("Emulated Daly BMS on a pty (for the agent's serial source).", DalyBms)


if __name__ == "__main__":
    main()
