"""What every server command shares: exit codes, input, times, the store, JSON output."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import string
from pathlib import Path
from typing import Any

from battery_trace.bounded_read import UnreadableInput, read_bounded

OK, INVALID, USAGE = 0, 1, 2
MAX_INPUT = 16 * 1024 * 1024


class UsageError(Exception):
    pass


def read_input(name: str) -> bytes:
    """Raw bytes or hex text (whitespace ignored), from a file or stdin."""
    try:
        data = read_bounded(name, MAX_INPUT)
    except UnreadableInput as exc:
        raise UsageError(str(exc)) from None
    text = b"".join(data.split())
    if text and all(chr(c) in string.hexdigits for c in text):
        if len(text) % 2:
            raise UsageError(f"{name} looks like hex text but has an odd number of digits")
        return bytes.fromhex(text.decode())
    return data


def parse_time(text: str) -> float:
    """ISO 8601 (a date, or a date and time; UTC unless it says otherwise) or Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time; valid: 2026-01-31, 2026-01-31T08:00:00Z or Unix seconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def iso(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def iso_ms(ms: int | None) -> str:
    return iso(None if ms is None else ms / 1000)


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2, default=str))


def config(args: argparse.Namespace) -> Any:
    from battery_trace.server import config as server_config

    return server_config.load(Path(args.config) if args.config else None)


def open_store(args: argparse.Namespace) -> Any:
    from battery_trace.server.store import Store

    cfg = config(args)
    return Store(cfg.store_url, cfg.rules)


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="server TOML config (default: the embedded store in $BT_HOME)")


def add_json(p: argparse.ArgumentParser, what: str = "print the result as JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)
