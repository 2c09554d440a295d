"""Line-oriented serial devices: code-label scanners, the swap station's PLC, a technician's keypad.

Lines end with CR, LF or CRLF, depending on the device's settings; a line split across reads is
joined, and an overlong line (a device stuck, or the wrong device on the port) is dropped up to its
end. What a line means is up to the parser given to the reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from battery_trace.agent.readings import DecodeError, Identity
from battery_trace.protocol.battery_code import normalise

MAX_LINE = 128
T = TypeVar("T")


class LineReader(Generic[T]):
    def __init__(self, parse: Callable[[str], T | DecodeError]) -> None:
        self.parse = parse
        self._buf = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[T | DecodeError]:
        out: list[T | DecodeError] = []
        for byte in chunk:
            if byte in (0x0D, 0x0A):
                if self._skipping:
                    self._skipping = False
                elif self._buf:
                    out.append(self._line(bytes(self._buf)))
                self._buf.clear()
            elif not self._skipping:
                self._buf.append(byte)
                if len(self._buf) > MAX_LINE:
                    out.append(DecodeError("line_too_long", f"no line end within {MAX_LINE} bytes"))
                    self._buf.clear()
                    self._skipping = True
        return out

    def _line(self, raw: bytes) -> T | DecodeError:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return DecodeError("not_ascii", f"line is not ASCII: {raw[:40]!r}")
        if not text.strip():
            return DecodeError("empty", "blank line")
        return self.parse(text)


def scanned_code(text: str) -> Identity | DecodeError:
    """A scanned label: the code, normalised; validated later by the sealer, which refuses a wrong one."""
    return Identity(source="label", code=normalise(text))


def label_reader() -> LineReader[Identity]:
    return LineReader(scanned_code)
