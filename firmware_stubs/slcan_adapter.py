"""An slcan (Lawicel) USB-CAN adapter on a pty, so a CAN stub in one process reaches the agent in
another the way real hardware does: python-can's ``slcan`` interface opens the pty's path unchanged.

The adapter answers the host's commands (``S<n>`` bitrate, ``O``/``L`` open, ``C`` close, ``V``/``N``
version and serial number) with CR, or BEL for what it does not know, and, while the channel is open,
writes every frame put on its emulated bus as ``T<8 hex id><dlc><data>`` (``t`` for 11-bit ids).

Fault modes, as real adapters show them: ``send_raw`` writes any bytes as they are (a line cut short by
a USB glitch, ``T12\r``; noise; a non-ASCII byte), and ``mute`` makes the adapter stop forwarding frames
while its port stays open and it still answers commands (a hung adapter firmware, or a dead CAN
transceiver behind a live USB chip).

Run a GB/T 27930 charging session through one:
    python -m firmware_stubs.slcan_adapter --link /tmp/can-slot1 --session gbt27930
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from battery_trace.firmware_stubs import dbc_pack, gbt27930_bms
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.firmware_stubs.serial_stub import SerialStub


def slcan_line(arbitration_id: int, data: bytes, extended: bool = True) -> bytes:
    if extended:
        return f"T{arbitration_id:08X}{len(data)}{data.hex().upper()}\r".encode()
    return f"t{arbitration_id:03X}{len(data)}{data.hex().upper()}\r".encode()


class SlcanAdapter(SerialStub):
    def __init__(self, link: PtyLink) -> None:
        super().__init__(link)
        self.is_open = threading.Event()
        self.muted = threading.Event()
        self.commands: list[str] = []

    def parse_request(self, buf: bytearray) -> tuple[str | None, int]:
        end = buf.find(b"\r")
        if end < 0:
            return None, 0
        return buf[:end].decode("ascii", errors="replace").strip() or None, end + 1

    def answer(self, command: str) -> bytes:
        self.commands.append(command)
        head = command[:1]
        if head in ("S", "s"):
            return b"\r"
        if head in ("O", "L"):
            self.is_open.set()
            return b"\r"
        if head == "C":
            self.is_open.clear()
            return b"\r"
        replies = {"V": b"V1013\r", "v": b"v1013\r", "N": b"NBT01\r", "T": b"Z\r", "t": b"z\r"}
        return replies.get(head, b"\a")

    def send(self, arbitration_id: int, data: bytes, extended: bool = True) -> bool:
        """Put a frame on the bus; it reaches the host only while the channel is open and not muted."""
        if not self.is_open.is_set() or self.muted.is_set():
            return False
        return self.write(slcan_line(arbitration_id, data, extended))

    def send_raw(self, data: bytes) -> bool:
        """Write bytes to the host unchanged: a truncated or garbled line, which no encoder would produce."""
        return self.write(data)

    def mute(self, muted: bool = True) -> None:
        """Stop (or resume) forwarding bus frames; commands are still answered."""
        if muted:
            self.muted.set()
        else:
            self.muted.clear()


class Player:
    """Plays frames through an adapter at a steady interval, in a loop if asked; for stubs and demos."""

    def __init__(self, adapter: SlcanAdapter, interval_s: float = 0.005) -> None:
        self.adapter = adapter
        self.interval_s = interval_s
        self.sent = 0
        self._stop = threading.Event()

    def play(self, frames: Iterable[tuple[int, bytes]]) -> None:
        for arbitration_id, data in frames:
            if self._stop.is_set():
                return
            if self.adapter.send(arbitration_id, data):
                self.sent += 1
            self._stop.wait(self.interval_s)

    def loop(self, make_frames, pause_s: float = 0.5) -> None:
        while not self._stop.is_set():
            self.play(make_frames())
            self._stop.wait(pause_s)

    def start_loop(self, make_frames, pause_s: float = 0.5) -> threading.Thread:
        self._thread = threading.Thread(target=self.loop, args=(make_frames, pause_s), daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)


def gbt27930_frames(
    pack: gbt27930_bms.Pack, rounds: int, rng: random.Random | None = None, lose: float = 0.0, noise: float = 0.0
) -> list[tuple[int, bytes]]:
    frames = gbt27930_bms.charging_session(pack, rounds)
    if rng is not None:
        frames = gbt27930_bms.with_faults(frames, rng, lose=lose, noise=noise)
    return [(f.arbitration_id, f.data) for f in frames]


def main() -> None:
    p = argparse.ArgumentParser(description="An slcan USB-CAN adapter on a pty, playing an emulated device.")
    p.add_argument("--link", required=True, help="symlink path to create for the adapter's serial port")
    p.add_argument("--session", choices=("gbt27930", "dbc"), default="gbt27930")
    p.add_argument("--interval", type=float, default=0.005, help="seconds between frames")
    args = p.parse_args()
    link = PtyLink(Path(args.link))
    adapter = SlcanAdapter(link)
    adapter.start()
    player = Player(adapter, args.interval)
    print(f"slcan adapter on {args.link} -> {os.readlink(args.link)}", flush=True)
    make = (
        (lambda: gbt27930_frames(gbt27930_bms.Pack(), 20))
        if args.session == "gbt27930"
        else (lambda: dbc_pack.broadcast(dbc_pack.VendorPack()))
    )
    try:
        player.loop(make)
    except KeyboardInterrupt:
        pass
    finally:
        time.sleep(0.1)
        link.close()


if __name__ == "__main__":
    main()
