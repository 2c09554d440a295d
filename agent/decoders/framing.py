"""Finding frames in a serial byte stream: the resynchronising loop every UART protocol shares.

Frame boundaries come only from the protocol: a start byte, a length, a check. Bytes before a start
byte are garbage; a candidate frame that fails its check started at a false start byte (or was
damaged), so the search resumes one byte later. Every skip is reported, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from battery_trace.agent.readings import DecodeError

F = TypeVar("F")


class FrameReader(Generic[F]):
    """``frame_size(buf)`` says how long the frame starting at buf[0] is (None: not enough bytes yet);
    ``check(frame)`` returns the frame or the DecodeError explaining why it is not one."""

    def __init__(
        self,
        start: int,
        frame_size: Callable[[bytearray], int | None],
        check: Callable[[bytes], F | DecodeError],
    ) -> None:
        self.start = start
        self.frame_size = frame_size
        self.check = check
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[F | DecodeError]:
        self._buf += data
        out: list[F | DecodeError] = []
        while True:
            start = self._buf.find(self.start)
            if start < 0:
                if self._buf:
                    out.append(DecodeError("garbage", f"skipped {len(self._buf)} bytes without a start byte"))
                self._buf.clear()
                return out
            if start:
                out.append(DecodeError("garbage", f"skipped {start} bytes before a start byte"))
                del self._buf[:start]
            size = self.frame_size(self._buf)
            if size is None or len(self._buf) < size:
                return out  # wait for the rest; a lost tail is caught by the next frame's check
            result = self.check(bytes(self._buf[:size]))
            if isinstance(result, DecodeError):
                out.append(result)
                del self._buf[:1]  # a false start byte or a damaged frame: look for the next start byte
                continue
            del self._buf[:size]
            out.append(result)
