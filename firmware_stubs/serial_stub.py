"""What every emulated serial device shares: a pty link, a request parser, fault injection."""

from __future__ import annotations

import os
import random
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from battery_trace.firmware_stubs.pty_link import PtyLink


@dataclass
class Faults:
    noise: float = 0.0  # probability of garbage bytes before an answer
    bit_flip: float = 0.0  # probability of one flipped bit in an answer
    truncate: float = 0.0  # probability of an answer cut short
    bad_checksum: float = 0.0  # probability of a corrupted checksum byte
    silent: float = 0.0  # probability of not answering at all


class SerialStub:
    """Answers requests arriving on ``link``'s master side until stopped. Subclasses say how to find a
    request in the received bytes and what to answer."""

    def __init__(self, link: PtyLink, faults: Faults | None = None, seed: int = 1) -> None:
        self.link = link
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.requests = 0
        self._stop = threading.Event()
        self._buf = bytearray()
        self._write_lock = threading.Lock()

    def parse_request(self, buf: bytearray) -> tuple[Any | None, int]:
        """(the first complete request in ``buf`` or None, how many bytes to drop from the front)."""
        raise NotImplementedError

    def answer(self, request: Any) -> bytes:
        raise NotImplementedError

    def faulty(self, frame: bytes) -> bytes:
        f, rng = self.faults, self.rng
        if rng.random() < f.silent:
            return b""
        out = bytearray(frame)
        if rng.random() < f.bad_checksum:
            out[-2 if len(out) > 2 else -1] ^= 0x5A
        if rng.random() < f.bit_flip:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        if rng.random() < f.truncate:
            out = out[: rng.randrange(1, len(out))]
        if rng.random() < f.noise:
            out[:0] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        return bytes(out)

    def _requests(self) -> list[Any]:
        found = []
        while True:
            request, consumed = self.parse_request(self._buf)
            del self._buf[:consumed]
            if request is None:
                if consumed == 0:
                    return found
                continue
            found.append(request)

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
            for request in self._requests():
                self.requests += 1
                if not self.write(self.answer(request)):
                    break

    def write(self, data: bytes) -> bool:
        """Send bytes to the host; False when the link is unplugged."""
        with self._write_lock:
            fd = self.link.master
            if fd is None:
                return False
            try:
                os.write(fd, data)
            except OSError:
                return False
            return True

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        """Stop and wait for the serving thread: after this, the link can be closed safely (a thread still
        holding the old descriptor number could otherwise read from whatever file opens next under it)."""
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)


def run_cli(description: str, build: Callable[[PtyLink], SerialStub]) -> None:
    """The command line of a serial stub: a pty at --link, served until Ctrl-C."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--link", required=True, help="symlink path to create for the serial port")
    args = p.parse_args()
    link = PtyLink(Path(args.link))
    stub = build(link)
    print(f"{type(stub).__name__} on {args.link} -> {os.readlink(args.link)}", flush=True)
    try:
        stub.serve()
    except KeyboardInterrupt:
        pass
    finally:
        link.close()
