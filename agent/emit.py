"""``battery-agent emit``: lifecycle events typed by the responsible entity, from the command line or a
file, for the roles without sensors (manufacturer, vehicle maker, scrapper, recycler, repurposer).

Values arrive as text; each is converted by its field's kind (numbers, times, lists of codes, JSON
objects for health and materials) and the whole event is validated like any other draft, so a typo
is reported with its line, its field and what would be valid. A file is all or nothing: if any line
is wrong nothing is sealed, so a batch is never half submitted.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from battery_trace.agent.sealer import Draft
from battery_trace.protocol import events
from battery_trace.protocol.battery_code import normalise
from battery_trace.protocol.events import EVENT_TYPES, Kind

MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class LineError:
    where: str  # "line 7" or "--field code"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def parse_time(text: Any) -> int:
    """Milliseconds since the epoch from an ISO 8601 date/time (UTC unless it says otherwise) or an integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    value = str(text).strip()
    if value.isdigit():
        return int(value)
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not a time; valid: 2026-01-31, 2026-01-31T08:00:00Z or milliseconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def convert(kind: Kind, value: Any) -> Any:
    """A field's value from text (command line, CSV) or JSON, by the field's kind."""
    if not isinstance(value, str):
        return value  # JSON already typed it; validation decides
    text = value.strip()
    if kind in (Kind.TEXT, Kind.CHOICE, Kind.VIN):
        return text.upper() if kind is Kind.VIN else text
    if kind is Kind.CODE:
        return normalise(text)
    if kind is Kind.CODES:
        return [normalise(c) for c in text.split(",") if c.strip()]
    if kind is Kind.INT:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if kind is Kind.NUMBER:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind is Kind.TIME:
        return parse_time(text)
    try:
        return json.loads(text)  # HEALTH and MATERIALS: a JSON object
    except json.JSONDecodeError:
        raise ValueError(f'{text!r} is not a JSON object, e.g. {{"li": 4.2}}') from None


def draft(record: dict[str, Any], where: str, default_source: str, now_ms: int) -> Draft | list[LineError]:
    """One draft from a record holding ``type``, optional ``time`` and ``source``, and the type's fields."""
    record = {k: v for k, v in record.items() if v not in ("", None)}
    event_type = record.pop("type", None)
    if event_type not in EVENT_TYPES:
        return [LineError(where, f"type {event_type!r} is not an event type; valid: {', '.join(EVENT_TYPES)}")]
    spec = EVENT_TYPES[event_type]
    errors: list[LineError] = []
    try:
        time_ms = parse_time(record.pop("time")) if "time" in record else now_ms
    except ValueError as exc:
        errors.append(LineError(where, f"time: {exc}"))
        time_ms = now_ms
    source = record.pop("source", default_source)
    fields: dict[str, Any] = {}
    for name, value in record.items():
        f = spec.field(name)
        if f is None:
            fields[name] = value  # validation names it as unknown, with the valid ones
            continue
        try:
            fields[name] = convert(f.kind, value)
        except ValueError as exc:
            errors.append(LineError(where, f"{name}: {exc}"))
    errors += [LineError(where, str(e)) for e in events.body_errors(event_type, source, fields)]
    probe = events.Event("x", 1, events.ZERO_HASH, time_ms, event_type, source, fields)
    if not errors:
        errors += [LineError(where, str(p)) for p in (*events.code_problems(probe), *events.vin_problems(probe))]
    return errors or Draft(event_type, source, fields, time_ms)


def from_arguments(
    event_type: str, pairs: list[str], source: str, time_text: str | None, now_ms: int
) -> Draft | list[LineError]:
    record: dict[str, Any] = {"type": event_type, "source": source}
    if time_text:
        record["time"] = time_text
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            return [LineError(f"--field {pair}", "must be NAME=VALUE, e.g. --field code=0RJPEA00HAU0AAG1C3000123")]
        record[name.strip()] = value
    return draft(record, "arguments", source, now_ms)


def from_file(path: Path, source: str, now_ms: int) -> Iterator[Draft | list[LineError]]:
    """Drafts of a .jsonl file (one JSON object per line) or a .csv file (a header row of field names)."""
    if path.stat().st_size > MAX_FILE_BYTES:
        yield [LineError(str(path), f"larger than {MAX_FILE_BYTES} bytes; split it")]
        return
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "type" not in reader.fieldnames:
                yield [LineError("line 1", "a CSV needs a header row with a 'type' column and the fields' names")]
                return
            for number, row in enumerate(reader, start=2):
                if None in row:
                    yield [LineError(f"line {number}", "more cells than header columns")]
                    continue
                yield draft(dict(row), f"line {number}", source, now_ms)
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield [LineError(f"line {number}", f"not JSON ({exc.msg} at column {exc.colno})")]
                continue
            if not isinstance(record, dict):
                yield [LineError(f"line {number}", "each line must be a JSON object")]
                continue
            yield draft(record, f"line {number}", source, now_ms)
