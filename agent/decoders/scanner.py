"""Code-label scanners (USB-serial or RS-232 barcode/QR readers): one code per line.

Lines end with CR, LF or CRLF, depending on the scanner's settings; a line split across reads is
joined, and an overlong line (a scanner stuck or a wrong device on the port) is dropped up to its end.
The code is normalised here but validated by the sealer, which refuses to sign a wrong one.
"""

from __future__ import annotations

from agent.readings import DecodeError, Identity
from protocol.battery_code import normalise

MAX_LINE = 128


class LineReader:
    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, chunk: bytes) -> list[Identity | DecodeError]:
        out: list[Identity | DecodeError] = []
        for byte in chunk:
            if byte in (0x0D, 0x0A):
                if self._skipping:
                    self._skipping = False
                elif self._buf:
                    out.append(_line(bytes(self._buf)))
                self._buf.clear()
            elif not self._skipping:
                self._buf.append(byte)
                if len(self._buf) > MAX_LINE:
                    out.append(DecodeError("line_too_long", f"no line end within {MAX_LINE} bytes"))
                    self._buf.clear()
                    self._skipping = True
        return out


def _line(raw: bytes) -> Identity | DecodeError:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return DecodeError("not_ascii", f"scanned line is not ASCII: {raw[:40]!r}")
    code = normalise(text)
    if not code:
        return DecodeError("empty", "scanned line is blank")
    return Identity(source="label", code=code)
