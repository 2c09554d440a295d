"""Line devices on a pty: a code-label scanner, a swap station's PLC, a technician's keypad.

They only talk: each ``send`` writes one line with the device's line ending (scanners are commonly
set to CR, LF or CRLF). Noise and split writes can be injected to exercise the agent's line reader,
and a PLC's faults on the line: a sensor's bounce (``send`` twice), a line lost (not sent), a garbled
one (``garbled``), with or without the optional ``*HH`` checksum the line protocol allows.
"""

from __future__ import annotations

import os
import time

from battery_trace.firmware_stubs.pty_link import PtyLink


def with_checksum(line: str) -> str:
    """``line*HH``: HH the XOR of the line's bytes, as NMEA 0183 does (computed here, not by the agent)."""
    value = 0
    for byte in line.encode("ascii"):
        value ^= byte
    return f"{line}*{value:02X}"


def garbled(line: str, at: int, into: str = "?") -> str:
    """The line as a noisy wire delivers it: one character changed, the rest intact."""
    return line[:at] + into + line[at + 1 :]


class LineDevice:
    def __init__(self, link: PtyLink, ending: bytes = b"\r\n", checksum: bool = False) -> None:
        self.link = link
        self.ending = ending
        self.checksum = checksum

    def send(self, line: str, split: bool = False) -> bool:
        fd = self.link.master
        if fd is None:
            return False
        data = (with_checksum(line) if self.checksum else line).encode("ascii") + self.ending
        try:
            if split:  # a slow serial line delivers a line in pieces
                half = len(data) // 2
                os.write(fd, data[:half])
                time.sleep(0.05)
                os.write(fd, data[half:])
            else:
                os.write(fd, data)
        except OSError:
            return False
        return True

    def noise(self, data: bytes) -> None:
        if self.link.master is not None:
            os.write(self.link.master, data)
