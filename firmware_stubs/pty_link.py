"""A pseudo-terminal pair standing in for a USB-serial adapter: the stub holds the master side,
the agent opens the slave's path with pyserial exactly as it would open /dev/ttyUSB0.

``path`` is a stable symlink (like a udev rule's /dev/bms-slot1): unplugging closes the pty, and
plugging in again makes a new pty and points the same symlink at it, so the agent sees a port
vanish and come back under its configured name.
"""

from __future__ import annotations

import os
import tty
from pathlib import Path


class PtyLink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.master: int | None = None
        self._slave: int | None = None
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline: bytes pass unchanged
        tty.setraw(master)
        self.master, self._slave = master, slave
        tmp = self.path.with_name(self.path.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.path)

    def unplug(self) -> None:
        for fd in (self.master, self._slave):
            if fd is not None:
                os.close(fd)
        self.master = self._slave = None
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self.master is not None:
            self.unplug()
