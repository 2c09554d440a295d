"""What every server command shares: exit codes, input, times, the store, JSON output."""

from __future__ import annotations

import argparse
import json
import sqlite3
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from battery_trace.server import inputs

from battery_trace.bounded_read import UnreadableInput, read_bounded

OK, INVALID, USAGE = 0, 1, 2
MAX_INPUT = 16 * 1024 * 1024


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that names the flag and where the help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# SQLite's answers for a file that is not a database, or one whose pages do not hold together.
_CORRUPT = {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}


def corrupt_record(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorcode", None) in _CORRUPT


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


def time_arg(ahead_s: float | None = None) -> Callable[[str], float]:
    """An argparse type for a time (``inputs.time_s``); with ``ahead_s``, at most that far after now."""

    def convert(text: str) -> float:
        latest = inputs.LATEST if ahead_s is None else time.time() + ahead_s
        try:
            return inputs.time_s(text, latest=latest)
        except inputs.InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def whole_arg(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for a whole number in [low, high]."""

    def convert(text: str) -> int:
        try:
            return inputs.whole(text, low, high)
        except inputs.InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def iso(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return inputs.iso(seconds).replace("T", " ").removesuffix("Z")


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
    return Store(cfg.store_url, cfg.rules, cfg.quarantine)


def add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="server TOML config (default: the embedded store in $BT_HOME)")


def add_json(p: argparse.ArgumentParser, what: str = "print the result as JSON") -> None:
    p.add_argument("--json", action="store_true", help=what)
