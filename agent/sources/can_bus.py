"""CAN sources: any python-can interface (socketcan, slcan, pcan, kvaser, vector, virtual...) chosen by
config, decoded as GB/T 27930 or through a DBC file.

python-can's ``recv`` blocks, so a reader thread per bus hands frames to the event loop through a
bounded queue (a frame that does not fit is dropped and counted: a stalled loop must not grow memory
without bound). When the adapter disappears (a USB-CAN adapter unplugged), the bus is shut down and
opened again with capped backoff; every loss is counted and the agent keeps running.

One unreadable line never ends a reader: python-can's parsers raise whatever the line provokes
(``T12\r``, cut short by a USB glitch, is an IndexError inside the slcan parser), so anything but a
device error is counted as ``unreadable_frames`` and reading goes on with the next frame. A line the
interface cannot even decode (non-ASCII noise, which python-can's slcan keeps in its buffer) is
counted too, and the bus reopened, which clears it. Should the reader end for any other reason, the
consumer learns of it and the bus is reopened: a source never stays "connected" with a dead reader
behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
from battery_trace.agent.decoders import gbt27930
from battery_trace.agent.decoders.dbc import DbcDecoder, DbcMapping, load
from battery_trace.agent.decoders.j1939 import CanFrame, TransportReassembler
from battery_trace.agent.readings import DecodeError, Reading
from battery_trace.agent.sources.watch import Silence

log = logging.getLogger(__name__)
QUEUE_BOUND = 10_000
# What python-can raises when the adapter is gone or refuses (a serial error is wrapped as a CanError):
# the bus must be reopened. Anything else a recv raises is about one line, not the bus.
DEVICE_ERRORS = (can.CanError, OSError)


class _ReaderEnded(Exception):
    """The reader thread stopped without a device error; the bus is reopened."""


@dataclass(frozen=True)
class CanSettings:
    interface: str
    channel: str
    bitrate: int | None = 250_000
    protocol: str = "gbt27930"  # or "dbc"
    dbc: Path | None = None
    dbc_mapping: DbcMapping = field(default_factory=DbcMapping)
    options: dict[str, Any] = field(default_factory=dict)  # passed to can.Bus unchanged


class FrameDecoder:
    """Frames in, readings out, for one bus; counts what it had to drop by reason (in ``errors``, and in
    ``recent`` when given: the source's count of what came instead of a reading)."""

    def __init__(self, settings: CanSettings, recent: Counter[str] | None = None) -> None:
        self.errors: Counter[str] = Counter()
        self.recent = recent if recent is not None else Counter()
        if settings.protocol == "dbc":
            assert settings.dbc is not None
            self._dbc: DbcDecoder | None = DbcDecoder(load(settings.dbc, settings.dbc_mapping), settings.dbc_mapping)
        else:
            self._dbc = None
            self._tp = TransportReassembler()

    def feed(self, frame: CanFrame) -> list[Reading]:
        try:
            if self._dbc is not None:
                decoded = self._dbc.decode(frame)
                return self._dbc.readings(*decoded) if decoded else []
            out: list[Reading] = []
            for item in self._tp.feed(frame):
                if isinstance(item, DecodeError):
                    self._drop(item.reason)
                    continue
                message = gbt27930.decode(item)
                if message is not None:
                    out.extend(gbt27930.readings(message))
            return out
        except DecodeError as exc:
            self._drop(exc.reason)
            return []

    def _drop(self, reason: str) -> None:
        self.errors[reason] += 1
        self.recent[reason] += 1


class CanSource:
    def __init__(self, slot: int, settings: CanSettings, on_reading: Callable[[int, Reading], None]) -> None:
        self.slot = slot
        self.settings = settings
        self.on_reading = on_reading
        self.silence = Silence()
        self.decoder = FrameDecoder(settings, self.silence.instead)
        self.counters: Counter[str] = Counter()
        self.connected = False
        self.last_frame_at: float | None = None
        self._unreadable_logged = False

    # A CAN slot's BMS talks all the time while a battery is in it: a long silence is news.
    expects_traffic = True

    def decode_errors(self) -> Counter[str]:
        return self.decoder.errors

    @property
    def name(self) -> str:
        return f"can:{self.settings.interface}:{self.settings.channel}"

    def _open(self) -> can.BusABC:
        s = self.settings
        kwargs = dict(s.options)
        if s.bitrate:
            kwargs["bitrate"] = s.bitrate
        return can.Bus(interface=s.interface, channel=s.channel, **kwargs)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.2
        while True:
            try:
                bus = await asyncio.to_thread(self._open)
            except (*DEVICE_ERRORS, ValueError) as exc:  # ValueError: python-can refusing the channel
                self.counters["open_failures"] += 1
                log.warning("slot %s: cannot open %s (%s); retrying in %.1f s", self.slot, self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.2
            self.connected = True
            self._unreadable_logged = False
            self.counters["connects"] += 1
            log.info("slot %s: listening on %s", self.slot, self.name)
            queue: asyncio.Queue[can.Message | BaseException] = asyncio.Queue(QUEUE_BOUND)
            stop = threading.Event()
            reader = threading.Thread(target=self._read, args=(bus, loop, queue, stop), daemon=True)
            reader.start()
            try:
                await self._consume(queue)
            except Exception:  # a source must never take the agent down: log it, count it, reopen
                self.counters["unexpected_errors"] += 1
                log.exception("slot %s: %s failed unexpectedly; reopening", self.slot, self.name)
            finally:
                stop.set()
                await asyncio.to_thread(reader.join, 2.0)
                with contextlib.suppress(*DEVICE_ERRORS, ValueError):  # a vanished adapter cannot close
                    await asyncio.to_thread(bus.shutdown)
                self.connected = False
            self.counters["disconnects"] += 1
            log.warning("slot %s: lost %s; reopening", self.slot, self.name)

    def _read(
        self, bus: can.BusABC, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, stop: threading.Event
    ) -> None:
        def put(item: can.Message | BaseException) -> None:
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                self.counters["dropped_queue_full"] += 1

        ended: BaseException = _ReaderEnded("the reader stopped")
        try:
            while not stop.is_set():
                try:
                    msg = bus.recv(timeout=0.2)
                except DEVICE_ERRORS as exc:  # the adapter is gone, or its interface object cannot go on
                    if isinstance(exc.__cause__, ValueError):  # a non-ASCII line jams python-can's slcan buffer
                        loop.call_soon_threadsafe(self._unreadable, exc.__cause__)
                    ended = exc
                    return
                except Exception as exc:  # one line the interface could not parse: count it, read on
                    loop.call_soon_threadsafe(self._unreadable, exc)
                    continue
                if msg is not None:
                    loop.call_soon_threadsafe(put, msg)
        finally:  # however this thread ends, unless asked to, the consumer hears of it and reopens
            if not stop.is_set():
                loop.call_soon_threadsafe(put, ended)

    def _unreadable(self, exc: Exception) -> None:
        """Counted on the event loop's thread, like every other counter; logged once per connection
        (a wrong bitrate makes every line unreadable, and the count says how many)."""
        self.counters["unreadable_frames"] += 1
        self.silence.instead["unreadable_frames"] += 1
        if not self._unreadable_logged:
            self._unreadable_logged = True
            log.warning(
                "slot %s: %s sent a line it could not parse (%r); counting such lines", self.slot, self.name, exc
            )

    async def _consume(self, queue: asyncio.Queue) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                log.warning("slot %s: %s failed: %s", self.slot, self.name, item)
                return
            if item.is_error_frame or item.is_remote_frame:
                what = "error_frames" if item.is_error_frame else "remote_frames"
                self.counters[what] += 1
                self.silence.instead[what] += 1
                continue
            self.counters["frames"] += 1
            self.last_frame_at = time.time()
            frame = CanFrame(item.arbitration_id, bytes(item.data), item.timestamp, item.is_extended_id)
            readings = self.decoder.feed(frame)
            if readings:
                self.silence.heard()
            for reading in readings:
                self.on_reading(self.slot, reading)
