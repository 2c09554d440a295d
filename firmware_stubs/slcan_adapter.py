"""An slcan (Lawicel) USB-CAN adapter on a pty, so a CAN stub in one process reaches the agent in
another the way real hardware does: python-can's ``slcan`` interface opens the pty's path unchanged.

The adapter answers the host's commands (``S<n>`` bitrate, ``O``/``L`` open, ``C`` close, ``V``/``N``
version and serial number) with CR, or BEL for what it does not know, and, while the channel is open,
writes every frame put on its emulated bus as ``T<8 hex id><dlc><data>`` (``t`` for 11-bit ids).

Run a GB/T 27930 charging session through one:
    python -m firmware_stubs.slcan_adapter --link /tmp/can-slot1 --session gbt27930
"""

from __future__ import annotations

import argparse
import os
import random
import select
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from firmware_stubs import dbc_pack, gbt27930_bms
from firmware_stubs.pty_link import PtyLink


def slcan_line(arbitration_id: int, data: bytes, extended: bool = True) -> bytes:
    if extended:
        return f"T{arbitration_id:08X}{len(data)}{data.hex().upper()}\r".encode()
    return f"t{arbitration_id:03X}{len(data)}{data.hex().upper()}\r".encode()


class SlcanAdapter:
    def __init__(self, link: PtyLink) -> None:
        self.link = link
        self.is_open = threading.Event()
        self.commands: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._buf = bytearray()

    def _reply(self, command: str) -> bytes:
        head = command[:1]
        if head in ("S", "s"):
            return b"\r"
        if head in ("O", "L"):
            self.is_open.set()
            return b"\r"
        if head == "C":
            self.is_open.clear()
            return b"\r"
        if head == "V":
            return b"V1013\r"
        if head == "v":
            return b"v1013\r"
        if head == "N":
            return b"NBT01\r"
        if head == "T":
            return b"Z\r"
        if head == "t":
            return b"z\r"
        return b"\a"

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
            except OSError:
                self._stop.wait(0.05)
                continue
            while b"\r" in self._buf:
                line, _, rest = self._buf.partition(b"\r")
                self._buf = bytearray(rest)
                command = line.decode("ascii", errors="replace").strip()
                if command:
                    self.commands.append(command)
                    self._write(self._reply(command))

    def _write(self, data: bytes) -> bool:
        with self._lock:
            fd = self.link.master
            if fd is None:
                return False
            try:
                os.write(fd, data)
            except OSError:
                return False
            return True

    def send(self, arbitration_id: int, data: bytes, extended: bool = True) -> bool:
        """Put a frame on the bus; it reaches the host only while the channel is open."""
        if not self.is_open.is_set():
            return False
        return self._write(slcan_line(arbitration_id, data, extended))

    def send_raw(self, data: bytes) -> bool:
        """Anything at all, as a broken adapter or a noisy line would send it."""
        return self._write(data)

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve, name="slcan-adapter", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop and wait for the serving thread, so the link can then be closed safely."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)


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
