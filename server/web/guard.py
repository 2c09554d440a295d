"""HTTP connections that cannot hold the web server's descriptors: at most ``max_connections`` open
at once, and each request's headers complete within ``header_timeout_s`` or the connection is cut.

uvicorn's h11 protocol has neither: 300 connections that each sent half a request line held 300
descriptors for as long as they liked (a slowloris), until the process could open no socket at all.
The deadline runs from the first byte of a request to the end of its headers, so dribbling one byte
a second does not extend it; the API takes no request bodies, so bytes after the headers begin the
next request and its own deadline.
"""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
END = b"\r\n\r\n"


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a header deadline (set by ``configure``)."""

    max_connections: ClassVar[int] = 200
    header_timeout_s: ClassVar[float] = 10.0
    open_now: ClassVar[int] = 0  # one event loop per web process: a class-wide count is the process's

    @classmethod
    def configure(cls, max_connections: int, header_timeout_s: float) -> type[GuardedH11]:
        return type("GuardedH11", (cls,), {"max_connections": max_connections, "header_timeout_s": header_timeout_s})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._guard_transport = transport
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""
        self._counted = GuardedH11.open_now < self.max_connections
        if not self._counted:
            log.warning("refused a connection: %d open, the most [web] max_connections allows", GuardedH11.open_now)
            transport.abort()
            return
        GuardedH11.open_now += 1
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        seen = self._tail + data
        if self._deadline is None:
            self._arm()  # a new request begins
        if END in seen:
            self._disarm()
            seen = seen.rsplit(END, 1)[1]
            if seen:
                self._arm()  # a pipelined request follows in the same bytes
        self._tail = seen[-(len(END) - 1) :]
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return
        self._counted = False
        GuardedH11.open_now -= 1
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = asyncio.get_running_loop().call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        log.warning("cut a connection: headers not complete in %g s ([web] header_timeout_s)", self.header_timeout_s)
        self._deadline = None
        self._guard_transport.abort()
