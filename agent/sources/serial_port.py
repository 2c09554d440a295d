"""Serial sources: UART/RS-485 BMSs polled on a real serial port (JBD, Daly) and code-label scanners.

pyserial is blocking, so each poll cycle runs in a worker thread and hands its readings back to the
event loop. Frame boundaries come from the protocols (start byte, length, checksum), never from
reads. A port that disappears (USB adapter unplugged) is closed and reopened with capped backoff,
and every loss is counted: the agent keeps running and says what happened. What was read of a
frame or a line before the port closed is dropped with it: the device on the new port starts afresh,
so half a line from before an unplug can never join the first line after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import termios
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serial
from battery_trace.agent.decoders import daly, jbd, scanner, station
from battery_trace.agent.readings import DecodeError, Reading
from battery_trace.agent.sources.watch import Silence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SerialSettings:
    port: str
    protocol: str = "jbd"  # jbd, daly, scanner, plc or keypad
    baud: int = 9600
    parity: str = "N"
    timeout_s: float = 0.5
    poll_interval_s: float = 1.0
    charge_positive: bool = True  # Daly firmwares differ in the sign of the current
    address: int = daly.HOST_ADDRESS  # Daly host address (0x40; some tools use 0x80)


class SerialSource:
    """Opens the port, runs ``cycle`` in a thread, hands readings on, reconnects when the port is lost."""

    pause_s: float = 0.0
    # A polled BMS answers every poll: a long silence is news. A line device speaks only when used.
    expects_traffic = True

    def __init__(self, slot: int, settings: SerialSettings, on_reading: Callable[[int, Reading], None]) -> None:
        self.slot = slot
        self.settings = settings
        self.on_reading = on_reading
        self.counters: Counter[str] = Counter()
        self.connected = False
        self.last_frame_at: float | None = None
        self.silence = Silence()
        self._port: serial.Serial | None = None

    @property
    def name(self) -> str:
        return f"serial:{self.settings.protocol}:{self.settings.port}"

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.2
        while True:
            try:
                readings = await asyncio.to_thread(self._guarded_cycle)
                backoff = 0.2
                for reading in readings:
                    loop.call_soon(self.on_reading, self.slot, reading)
                await asyncio.sleep(self.pause_s)
            except (serial.SerialException, OSError, termios.error) as exc:  # termios.error is not an OSError
                if self.connected:
                    self.counters["disconnects"] += 1
                    log.warning("slot %s: %s lost (%s)", self.slot, self.name, exc)
                else:
                    self.counters["open_failures"] += 1
                self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # a source must never take the agent down: log it, count it, start over
                self.counters["unexpected_errors"] += 1
                log.exception("slot %s: %s failed unexpectedly; reopening", self.slot, self.name)
                self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _guarded_cycle(self) -> list[Reading]:
        port = self._open()
        readings = self.cycle(port)
        if readings:
            self.last_frame_at = time.time()
            self.silence.heard()
        return readings

    def cycle(self, port: serial.Serial) -> list[Reading]:
        raise NotImplementedError

    def _open(self) -> serial.Serial:
        if self._port is None:
            s = self.settings
            self._port = serial.Serial(s.port, s.baud, parity=s.parity, timeout=0.05, exclusive=True)
            self.connected = True
            self.counters["connects"] += 1
            log.info("slot %s: opened %s", self.slot, self.name)
        return self._port

    def _close(self) -> None:
        self.connected = False
        if self._port is not None:
            with contextlib.suppress(serial.SerialException, OSError, termios.error):
                self._port.close()
            self._port = None
        self.reset()

    def reset(self) -> None:
        """Forget what was read of an unfinished frame or line: the port it came from is closed."""

    def count(self, error: DecodeError) -> None:
        self.counters[f"bad_frame:{error.reason}"] += 1
        self.silence.instead[error.reason] += 1

    def decode_errors(self) -> Counter[str]:
        return Counter(
            {k.removeprefix("bad_frame:"): v for k, v in self.counters.items() if k.startswith("bad_frame:")}
        )


class JbdPoller(SerialSource):
    """Polls a JBD BMS: one read request per register, then reads its answer. The model string is read
    again (first, before any health) whenever the BMS speaks after a silence: it may be another pack."""

    def __init__(self, slot: int, settings: SerialSettings, on_reading: Callable[[int, Reading], None]) -> None:
        super().__init__(slot, settings, on_reading)
        self.pause_s = settings.poll_interval_s
        self._model_known = False

    def cycle(self, port: serial.Serial) -> list[Reading]:
        registers = [jbd.BASIC, jbd.CELLS] if self._model_known else [jbd.MODEL, jbd.BASIC, jbd.CELLS]
        readings = []
        missed = self.counters["timeouts"]
        for register in registers:
            reading = self._ask(port, register)
            if reading is not None:
                readings.append(reading)
                self._model_known = self._model_known or register == jbd.MODEL
        # An unanswered request is a silence: whoever answers next may be another pack, and is read anew.
        self._model_known = self._model_known and self.counters["timeouts"] == missed
        return readings

    def _ask(self, port: serial.Serial, register: int) -> Reading | None:
        port.reset_input_buffer()
        port.write(jbd.read_request(register))
        reader = jbd.reader()
        deadline = time.monotonic() + self.settings.timeout_s
        while time.monotonic() < deadline:
            for item in reader.feed(port.read(256)):
                if isinstance(item, DecodeError):
                    self.count(item)
                elif item.register != register:
                    self.counters["bad_frame:unexpected_register"] += 1
                else:
                    try:
                        reading = jbd.decode(item)
                    except DecodeError as exc:
                        self.count(exc)
                        return None
                    self.counters["frames"] += 1
                    return reading
        self.counters["timeouts"] += 1
        return None


class DalyPoller(SerialSource):
    """Polls a Daly BMS: pack, cell range, capacity, status, every cell and probe, alarms, and its code.
    The code is read first, before any health, and again whenever the BMS speaks after a silence (it may
    be another pack). The number of cells and probes comes from the status answer (0x94)."""

    def __init__(self, slot: int, settings: SerialSettings, on_reading: Callable[[int, Reading], None]) -> None:
        super().__init__(slot, settings, on_reading)
        self.pause_s = settings.poll_interval_s
        self._code_known = False
        self._cells = 0
        self._probes = 0

    def cycle(self, port: serial.Serial) -> list[Reading]:
        readings: list[Reading] = []
        missed = self.counters["timeouts"]
        if not self._code_known:
            readings.extend(self._multi(port, daly.CODE, 4, None))  # 24 characters, 7 per frame
            self._code_known = bool(readings)
        for command in (daly.PACK, daly.CELL_RANGE, daly.MOS, daly.STATUS, daly.ALARMS):
            frames = self._ask(port, command, 1)
            if frames:
                fields = daly.decode_frame(frames[0], self.settings.charge_positive)
                if command == daly.STATUS:
                    self._cells, self._probes = fields["cell_count"], fields["ntc_count"]
                readings.extend(daly.readings(command, fields))
        readings.extend(self._multi(port, daly.CELLS, math.ceil(self._cells / 3), self._cells))
        readings.extend(self._multi(port, daly.TEMPS, math.ceil(self._probes / 7), self._probes))
        # An unanswered request is a silence: whoever answers next may be another pack, and is read anew.
        self._code_known = self._code_known and self.counters["timeouts"] == missed
        return readings

    def _multi(self, port: serial.Serial, command: int, frames_wanted: int, count: int | None) -> list[Reading]:
        if not frames_wanted:
            return []
        frames = self._ask(port, command, frames_wanted)
        try:
            fields = daly.assemble(command, [daly.decode_frame(f) for f in frames], frames_wanted, count)
        except DecodeError as exc:
            self.count(exc)
            return []
        return daly.readings(command, fields)

    def _ask(self, port: serial.Serial, command: int, count: int) -> list[daly.Frame]:
        port.reset_input_buffer()
        port.write(daly.request(command, self.settings.address))
        reader = daly.reader()
        got: list[daly.Frame] = []
        deadline = time.monotonic() + self.settings.timeout_s
        while time.monotonic() < deadline and len(got) < count:
            for item in reader.feed(port.read(256)):
                if isinstance(item, DecodeError):
                    self.count(item)
                elif item.command == command:
                    got.append(item)
                    self.counters["frames"] += 1
        if len(got) < count:
            self.counters["timeouts"] += 1
        return got


class LineSource(SerialSource):
    """A line device (label scanner, PLC, keypad): reads whatever arrives and splits it into lines."""

    expects_traffic = False

    def __init__(self, slot: int, settings: SerialSettings, on_reading: Callable[[int, Any], None]) -> None:
        super().__init__(slot, settings, on_reading)
        self._parse = station.parse if settings.protocol in ("plc", "keypad") else scanner.scanned_code
        self.reset()

    def reset(self) -> None:
        self._lines: scanner.LineReader[Any] = scanner.LineReader(self._parse)

    def cycle(self, port: serial.Serial) -> list[Any]:
        chunk = port.read(max(1, port.in_waiting))  # waits at most the port timeout for the first byte
        readings: list[Any] = []
        for item in self._lines.feed(chunk):
            if isinstance(item, DecodeError):
                self.count(item)
            else:
                self.counters["frames"] += 1
                readings.append(item)
        return readings


SOURCES = {"jbd": JbdPoller, "daly": DalyPoller, "scanner": LineSource, "plc": LineSource, "keypad": LineSource}


def serial_source(slot: int, settings: SerialSettings, on_reading: Callable[[int, Reading], None]) -> SerialSource:
    return SOURCES[settings.protocol](slot, settings, on_reading)
