"""An emulated JBD ("smart BMS") on a serial link: answers read requests for registers 0x03-0x05.

Frames follow protocols.md §3: response ``DD reg status len payload chk_hi chk_lo 77`` with the
checksum ``(0x10000 - sum(status, len, payload)) & 0xFFFF``. Faults can be switched on to exercise
the agent: noise between frames, flipped bits, truncated frames and wrong checksums.

Run it on its own:  python -m firmware_stubs.jbd_bms --link /tmp/bms-slot1
"""

from __future__ import annotations

import argparse
import os
import random
import select
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from firmware_stubs.pty_link import PtyLink


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


@dataclass
class Faults:
    noise: float = 0.0  # probability of garbage bytes before an answer
    bit_flip: float = 0.0  # probability of one flipped bit in an answer
    truncate: float = 0.0  # probability of an answer cut short
    bad_checksum: float = 0.0  # probability of a wrong checksum
    silent: float = 0.0  # probability of not answering at all


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


class JbdBms:
    """Answers requests arriving on ``link``'s master side until stopped."""

    def __init__(self, link: PtyLink, state: PackState | None = None, faults: Faults | None = None, seed: int = 1):
        self.link = link
        self.state = state or PackState()
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.requests = 0
        self._stop = threading.Event()
        self._buf = bytearray()

    def answer(self, register: int) -> bytes:
        payloads = {
            0x03: lambda: basic_payload(self.state),
            0x04: lambda: cells_payload(self.state),
            0x05: lambda: self.state.model.encode("ascii"),
        }
        if register not in payloads:
            return response(register, b"", status=0x80)
        return response(register, payloads[register]())

    def _faulty(self, frame: bytes) -> bytes:
        f, rng = self.faults, self.rng
        if rng.random() < f.silent:
            return b""
        out = bytearray(frame)
        if rng.random() < f.bad_checksum:
            out[-2] ^= 0x5A
        if rng.random() < f.bit_flip:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        if rng.random() < f.truncate:
            out = out[: rng.randrange(1, len(out))]
        if rng.random() < f.noise:
            out[:0] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        return bytes(out)

    def _requests(self) -> list[int]:
        """Complete, well-formed read requests in the buffer: DD A5 reg 00 chk chk 77."""
        registers = []
        while True:
            start = self._buf.find(b"\xdd\xa5")
            if start < 0:
                del self._buf[:-1]
                return registers
            del self._buf[:start]
            if len(self._buf) < 7:
                return registers
            frame = bytes(self._buf[:7])
            if frame[3] == 0 and frame[6] == 0x77 and _sum16(frame[2:4]) == frame[4:6]:
                registers.append(frame[2])
                del self._buf[:7]
            else:
                del self._buf[:1]

    def serve(self) -> None:
        while not self._stop.is_set():
            fd = self.link.master
            if fd is None:
                self._stop.wait(0.05)
                continue
            try:
                ready, _, _ = select.select([fd], [], [], 0.05)
                if not ready:
                    continue
                self._buf += os.read(fd, 256)
            except OSError:  # unplugged while waiting, or nobody has the port open
                self._stop.wait(0.05)
                continue
            for register in self._requests():
                self.requests += 1
                try:
                    os.write(fd, self._faulty(self.answer(register)))
                except OSError:
                    break

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve, name="jbd-bms", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    p = argparse.ArgumentParser(description="Emulated JBD BMS on a pty (for the agent's serial source).")
    p.add_argument("--link", required=True, help="symlink path to create for the serial port")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--bit-flip", type=float, default=0.0)
    args = p.parse_args()
    link = PtyLink(Path(args.link))
    bms = JbdBms(link, faults=Faults(noise=args.noise, bit_flip=args.bit_flip))
    print(f"JBD BMS on {args.link} -> {os.readlink(args.link)}", flush=True)
    try:
        bms.serve()
    except KeyboardInterrupt:
        pass
    finally:
        link.close()


if __name__ == "__main__":
    main()
