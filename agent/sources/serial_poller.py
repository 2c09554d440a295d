"""Serial BMS sources: poll a UART BMS on a real serial port and hand its readings on.

pyserial is blocking, so each poll cycle runs in a worker thread; readings are handed back to the
event loop. A port that disappears (USB adapter unplugged) is closed and reopened with capped
backoff, and every loss is counted: the agent keeps running and says what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import serial

from agent.decoders import jbd
from agent.readings import DecodeError, Reading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SerialSettings:
    port: str
    protocol: str = "jbd"
    baud: int = 9600
    parity: str = "N"
    timeout_s: float = 0.5
    poll_interval_s: float = 1.0


class SerialPoller:
    """Polls a JBD BMS: one read request per register, then reads until that register answers."""

    def __init__(self, slot: int, settings: SerialSettings, on_reading: Callable[[int, Reading], None]) -> None:
        self.slot = slot
        self.settings = settings
        self.on_reading = on_reading
        self.counters: Counter[str] = Counter()
        self.connected = False
        self._port: serial.Serial | None = None
        self._model_known = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.2
        while True:
            try:
                readings = await asyncio.to_thread(self._cycle)
                backoff = 0.2
                for reading in readings:
                    loop.call_soon(self.on_reading, self.slot, reading)
                await asyncio.sleep(self.settings.poll_interval_s)
            except (serial.SerialException, OSError) as exc:
                if self.connected:
                    self.counters["disconnects"] += 1
                    log.warning("slot %s: serial port %s lost (%s)", self.slot, self.settings.port, exc)
                self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _open(self) -> serial.Serial:
        if self._port is None:
            s = self.settings
            self._port = serial.Serial(s.port, s.baud, parity=s.parity, timeout=0.05, exclusive=True)
            self.connected = True
            self.counters["connects"] += 1
            log.info("slot %s: opened %s", self.slot, s.port)
        return self._port

    def _close(self) -> None:
        self.connected = False
        if self._port is not None:
            with contextlib.suppress(serial.SerialException, OSError):
                self._port.close()
            self._port = None

    def _cycle(self) -> list[Reading]:
        port = self._open()
        registers = [jbd.BASIC, jbd.CELLS] if self._model_known else [jbd.BASIC, jbd.CELLS, jbd.MODEL]
        readings = []
        for register in registers:
            reading = self._ask(port, register)
            if reading is not None:
                readings.append(reading)
                self._model_known = self._model_known or register == jbd.MODEL
        return readings

    def _ask(self, port: serial.Serial, register: int) -> Reading | None:
        port.reset_input_buffer()
        port.write(jbd.read_request(register))
        reader = jbd.FrameReader()
        deadline = time.monotonic() + self.settings.timeout_s
        while time.monotonic() < deadline:
            chunk = port.read(256)
            for item in reader.feed(chunk):
                if isinstance(item, DecodeError):
                    self.counters[f"bad_frame:{item.reason}"] += 1
                    continue
                if item.register != register:
                    self.counters["bad_frame:unexpected_register"] += 1
                    continue
                try:
                    reading = jbd.decode(item)
                except DecodeError as exc:
                    self.counters[f"bad_frame:{exc.reason}"] += 1
                    return None
                self.counters["frames"] += 1
                return reading
        self.counters["timeouts"] += 1
        return None
