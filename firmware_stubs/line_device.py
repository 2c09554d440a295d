"""Line devices on a pty: a code-label scanner, a swap station's PLC, a technician's keypad.

They only talk: each ``send`` writes one line with the device's line ending (scanners are commonly
set to CR, LF or CRLF). Noise and split writes can be injected to exercise the agent's line reader.
"""

from __future__ import annotations

import os
import time

from battery_trace.firmware_stubs.pty_link import PtyLink


class LineDevice:
    def __init__(self, link: PtyLink, ending: bytes = b"\r\n") -> None:
        self.link = link
        self.ending = ending

    def send(self, line: str, split: bool = False) -> bool:
        fd = self.link.master
        if fd is None:
            return False
        data = line.encode("ascii") + self.ending
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
