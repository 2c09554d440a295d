"""``bindings list|remove``: the BMS identities the agent has bound to battery codes, or distrusts.

The person who must decide about a binding (a pack re-labelled, a BMS identity that turned out not to be
unique) sees them here and removes one; the running agent picks a removal up when it restarts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from battery_trace.agent.cli.common import INVALID, OK, USAGE

from battery_trace.settings import ConfigError

RAW = argparse.RawDescriptionHelpFormatter


def _open(args: argparse.Namespace) -> sqlite3.Connection:
    """The agent's outbox database (which holds the bindings); ConfigError when there is none to read."""
    from battery_trace.agent import config
    from battery_trace.agent.identity import open_db

    path: Path = config.load(Path(args.config)).outbox_path
    if not path.is_file():
        raise ConfigError(f"{path}: no outbox there yet, so no bindings (has `battery-agent run` been started?)")
    try:
        return open_db(path)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: cannot read its bindings ({exc})") from None


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "-"


def list_bindings(args: argparse.Namespace) -> int:
    from battery_trace.agent.identity import listing

    try:
        with contextlib.closing(_open(args)) as db:
            rows = listing(db)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    if args.json:
        print(json.dumps(rows, indent=2))
        return OK
    if not rows:
        print("no bindings")
    for row in rows:
        print(_line(row))
    return OK


def _line(row: dict[str, Any]) -> str:
    bound = f"-> {row['code']} ({row['source']}, {_when(row['bound_at'])})" if row["code"] else "-> no code"
    distrust = f"  DISTRUSTED since {_when(row['distrusted_at'])}: {row['distrusted']}" if row["distrusted"] else ""
    return f"{row['secondary']} {bound}{distrust}"


def remove_binding(args: argparse.Namespace) -> int:
    from battery_trace.agent.identity import remove

    try:
        with contextlib.closing(_open(args)) as db:
            gone = remove(db, args.secondary)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    if not gone:
        print(f"{args.secondary!r} is not bound nor distrusted; see `battery-agent bindings list`", file=sys.stderr)
        return INVALID
    print(f"removed {args.secondary}; restart the agent for it to take effect")
    return OK


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bindings",
        help="list or remove BMS identities bound to battery codes",
        description="A BMS identity (a GB/T 27930 BRM's manufacturer, serial and date) seen with a scanned code "
        "is bound to it; one seen with two codes, or on two slots at once, is distrusted and no longer used. "
        "List them, or remove one once you know which pack it is (a re-labelled pack, a constant BMS serial).",
        epilog="examples:\n  battery-agent bindings list -c /etc/battery-agent/agent.toml\n"
        "  battery-agent bindings remove gbt27930:CATL:74565:2024-05-17 -c /etc/battery-agent/agent.toml",
        formatter_class=RAW,
    )
    verbs = b.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("list", help="every bound or distrusted BMS identity (exit 0)")
    ls.add_argument("-c", "--config", required=True, help="the agent's TOML config")
    ls.add_argument("--json", action="store_true", help="print them as JSON")
    ls.set_defaults(func=list_bindings)
    rm = verbs.add_parser("remove", help="forget one: exit 0 when removed, 1 when it was not known")
    rm.add_argument("secondary", metavar="IDENTITY", help="as `bindings list` shows it")
    rm.add_argument("-c", "--config", required=True, help="the agent's TOML config")
    rm.set_defaults(func=remove_binding)
