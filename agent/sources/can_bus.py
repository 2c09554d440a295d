"""CAN sources: any python-can interface (socketcan, slcan, pcan, kvaser, vector, virtual...) chosen by
config, decoded as GB/T 27930 or through a DBC file.

python-can's ``recv`` blocks, so a reader thread per bus hands frames to the event loop through a
bounded queue (a frame that does not fit is dropped and counted: a stalled loop must not grow memory
without bound). When the adapter disappears (a USB-CAN adapter unplugged), the bus is shut down and
opened again with capped backoff; every loss is counted and the agent keeps running.
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

log = logging.getLogger(__name__)
QUEUE_BOUND = 10_000


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
    """Frames in, readings out, for one bus; counts what it had to drop by reason."""

    def __init__(self, settings: CanSettings) -> None:
        self.errors: Counter[str] = Counter()
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
                    self.errors[item.reason] += 1
                    continue
                message = gbt27930.decode(item)
                if message is not None:
                    out.extend(gbt27930.readings(message))
            return out
        except DecodeError as exc:
            self.errors[exc.reason] += 1
            return []


class CanSource:
    def __init__(self, slot: int, settings: CanSettings, on_reading: Callable[[int, Reading], None]) -> None:
        self.slot = slot
        self.settings = settings
        self.on_reading = on_reading
        self.decoder = FrameDecoder(settings)
        self.counters: Counter[str] = Counter()
        self.connected = False
        self.last_frame_at: float | None = None

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
            except (can.CanError, OSError, ValueError) as exc:
                self.counters["open_failures"] += 1
                log.warning("slot %s: cannot open %s (%s); retrying in %.1f s", self.slot, self.name, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.2
            self.connected = True
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
                with contextlib.suppress(can.CanError, OSError, ValueError):  # a vanished adapter cannot close
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

        while not stop.is_set():
            try:
                msg = bus.recv(timeout=0.2)
            except (can.CanError, OSError, ValueError) as exc:  # the adapter is gone, or spoke nonsense
                loop.call_soon_threadsafe(put, exc)
                return
            if msg is not None:
                loop.call_soon_threadsafe(put, msg)

    async def _consume(self, queue: asyncio.Queue) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                log.warning("slot %s: %s failed: %s", self.slot, self.name, item)
                return
            if item.is_error_frame or item.is_remote_frame:
                self.counters["error_frames"] += 1
                continue
            self.counters["frames"] += 1
            self.last_frame_at = time.time()
            frame = CanFrame(item.arbitration_id, bytes(item.data), item.timestamp, item.is_extended_id)
            for reading in self.decoder.feed(frame):
                self.on_reading(self.slot, reading)
