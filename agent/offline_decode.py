"""``battery-agent decode``: recorded traffic in, one JSON object per decoded message out.

Field engineers debug a site from a capture: CAN logs in any format python-can reads (candump
``.log``, ASC, BLF, CSV, TRC) or lines ``ID#DATA`` as candump and cansend print them; serial
captures as hex text of the byte stream. Decoding uses the agent's own decoders, so what this prints
is what the agent would have understood. Malformed input is reported on stderr with its line and
skipped; a summary of what was decoded and what was dropped, by reason, ends the run.
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from battery_trace.agent.decoders import daly, gbt27930, j1939, jbd
from battery_trace.agent.decoders.dbc import DbcDecoder, DbcMapping
from battery_trace.agent.decoders.j1939 import CanFrame
from battery_trace.agent.readings import DecodeError, Health, Identity

CAN_LOG_SUFFIXES = (".asc", ".blf", ".csv", ".log", ".trc")
# "(1700000000.123456) can0 18FF5300#0102", "18FF5300#0102", "can0  18FF5300   [2]  01 02"
_CANDUMP = re.compile(
    r"^\s*(?:\((?P<ts>[\d.]+)\)\s+)?(?:(?P<iface>[\w.-]+)\s+)?(?P<id>[0-9A-Fa-f]{1,8})"
    r"(?:#(?P<data>[0-9A-Fa-f]*)|\s+\[(?P<len>\d)\]\s*(?P<bytes>(?:[0-9A-Fa-f]{2}\s*)*))\s*$"
)


class Printer:
    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.out, self.err = out, err
        self.decoded = 0
        self.dropped: Counter[str] = Counter()

    def message(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.decoded += 1

    def problem(self, reason: str, detail: str, where: str = "") -> None:
        self.dropped[reason] += 1
        self.err.write(f"{where + ': ' if where else ''}{reason}: {detail}\n")

    def summary(self) -> None:
        drops = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items())) or "none"
        self.err.write(f"decoded {self.decoded} messages; dropped: {drops}\n")


def can_frames(source: str, printer: Printer) -> Iterator[CanFrame]:
    """CAN frames from a python-can log file, or from candump-style text lines."""
    if source != "-" and Path(source).suffix.lower() in CAN_LOG_SUFFIXES and not _is_plain_text(Path(source)):
        import can

        for msg in can.LogReader(source):
            if not msg.is_error_frame and not msg.is_remote_frame:
                yield CanFrame(msg.arbitration_id, bytes(msg.data), msg.timestamp, msg.is_extended_id)
        return
    stream = sys.stdin if source == "-" else open(source, encoding="utf-8", errors="replace")  # noqa: SIM115
    try:
        for number, line in enumerate(stream, start=1):
            if not line.strip() or line.lstrip().startswith(("#", "//")):
                continue
            m = _CANDUMP.match(line)
            if m is None:
                printer.problem("bad_line", f"not ID#DATA or candump output: {line.strip()[:60]!r}", f"line {number}")
                continue
            raw = m["data"] if m["data"] is not None else (m["bytes"] or "").replace(" ", "")
            if len(raw) % 2 or len(raw) > 16:
                printer.problem("bad_line", f"data {raw!r} is not 0-8 whole bytes", f"line {number}")
                continue
            ts = float(m["ts"]) if m["ts"] else number * 0.001  # without times, keep the order and spacing
            yield CanFrame(int(m["id"], 16), bytes.fromhex(raw), ts, len(m["id"]) > 3)
    finally:
        if stream is not sys.stdin:
            stream.close()


def _is_plain_text(path: Path) -> bool:
    """candump's .log is text python-can reads; a .log of bare ID#DATA lines is ours to read."""
    try:
        first = next((line for line in path.read_text(errors="replace").splitlines() if line.strip()), "")
    except OSError:
        return False
    return path.suffix.lower() == ".log" and not first.lstrip().startswith("(")


def serial_bytes(source: str) -> bytes:
    text = sys.stdin.read() if source == "-" else Path(source).read_text(errors="replace")
    digits = "".join(text.split())
    bad = next((c for c in digits if c not in string.hexdigits), None)
    if bad is not None:
        raise ValueError(f"serial captures are hex text; found {bad!r}")
    if len(digits) % 2:
        raise ValueError("serial capture has an odd number of hex digits")
    return bytes.fromhex(digits)


def _health_json(reading: Health | Identity) -> dict[str, Any]:
    if isinstance(reading, Identity):
        return {k: v for k, v in asdict(reading).items() if v not in (None, {})}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in reading.present().items()}


def decode_gbt27930(frames: Iterable[CanFrame], printer: Printer) -> None:
    tp = j1939.TransportReassembler()
    for frame in frames:
        for item in tp.feed(frame):
            if isinstance(item, DecodeError):
                printer.problem(item.reason, str(item), f"t={frame.timestamp:.3f}")
                continue
            try:
                decoded = gbt27930.decode(item)
            except DecodeError as exc:
                printer.problem(exc.reason, str(exc), f"t={frame.timestamp:.3f}")
                continue
            if decoded is None:
                name = gbt27930.CHARGER_PGNS[item.pgn]
                printer.message(
                    {
                        "message": name,
                        "source": f"0x{item.source:02x}",
                        "time": round(item.timestamp, 6),
                        "data": item.data.hex(),
                    }
                )
            else:
                printer.message(decoded.to_json())
    for problem in tp.flush():
        printer.problem(problem.reason, str(problem), "end of capture")


def decode_dbc(frames: Iterable[CanFrame], decoder: DbcDecoder, printer: Printer) -> None:
    for frame in frames:
        try:
            decoded = decoder.decode(frame)
        except DecodeError as exc:
            printer.problem(exc.reason, str(exc), f"t={frame.timestamp:.3f}")
            continue
        if decoded is None:
            printer.problem("unknown_id", f"0x{frame.arbitration_id:x} is not in the DBC", f"t={frame.timestamp:.3f}")
            continue
        name, values = decoded
        printer.message(
            {"message": name, "time": round(frame.timestamp, 6), **{k: _plain(v) for k, v in values.items()}}
        )


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)  # scaled DBC values carry binary noise (398.20000000000005)
    return value if isinstance(value, int | str) else str(value)


def decode_jbd(data: bytes, printer: Printer) -> None:
    names = {jbd.BASIC: "basic_info", jbd.CELLS: "cell_voltages", jbd.MODEL: "model"}
    for item in jbd.reader().feed(data):
        if isinstance(item, DecodeError):
            printer.problem(item.reason, str(item))
            continue
        try:
            reading = jbd.decode(item)
        except DecodeError as exc:
            printer.problem(exc.reason, str(exc))
            continue
        printer.message({"message": names[item.register], **_health_json(reading)})


def decode_daly(data: bytes, printer: Printer, charge_positive: bool = True) -> None:
    for item in daly.reader().feed(data):
        if isinstance(item, DecodeError):
            printer.problem(item.reason, str(item))
            continue
        try:
            fields = daly.decode_frame(item, charge_positive)
        except DecodeError as exc:
            printer.problem(exc.reason, str(exc))
            continue
        printer.message({"message": daly.COMMANDS[item.command], "address": f"0x{item.address:02x}", **fields})


def run(protocol: str, source: str, dbc: Path | None, out: TextIO, err: TextIO) -> Printer:
    printer = Printer(out, err)
    if protocol in ("gbt27930", "dbc"):
        frames = can_frames(source, printer)
        if protocol == "gbt27930":
            decode_gbt27930(frames, printer)
        else:
            from battery_trace.agent.decoders import dbc as dbc_module

            assert dbc is not None
            decode_dbc(frames, DbcDecoder(dbc_module.load(dbc, DbcMapping()), DbcMapping()), printer)
    elif protocol == "jbd":
        decode_jbd(serial_bytes(source), printer)
    else:
        decode_daly(serial_bytes(source), printer)
    printer.summary()
    return printer
