"""``decode``: recorded CAN or serial traffic, decoded offline with the agent's own decoders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from battery_trace.agent.cli.common import INVALID, OK, USAGE


def decode(args: argparse.Namespace) -> int:
    from battery_trace.agent import offline_decode
    from battery_trace.agent.decoders.dbc import DbcError

    if args.protocol == "dbc" and not args.dbc:
        print("error: --protocol dbc needs --dbc FILE", file=sys.stderr)
        return USAGE
    source = args.file
    if source != "-" and not Path(source).is_file():
        print(f"error: cannot read {source}: no such file", file=sys.stderr)
        return USAGE
    try:
        printer = offline_decode.run(
            args.protocol, source, Path(args.dbc) if args.dbc else None, sys.stdout, sys.stderr
        )
    except (DbcError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    return OK if printer.decoded or not printer.dropped else INVALID


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "decode",
        help="decode recorded CAN or serial traffic offline",
        description="Decode a capture with the agent's own decoders and print one JSON object per decoded "
        "message (fields in SI units: V, A, Ah, kWh, °C, %%). CAN input: any log python-can reads (candump .log, "
        "ASC, BLF, CSV, TRC) or lines ID#DATA as candump prints them. Serial input: hex text of the byte "
        "stream (whitespace and line breaks ignored). Malformed input is reported on stderr and skipped. Exit 0 "
        "when something was decoded, 1 when nothing could be, 2 on usage errors.",
        epilog="examples:\n  battery-agent decode --protocol gbt27930 charge-session.log\n"
        "  candump -L can0 | battery-agent decode --protocol dbc --dbc configs/vendor-pack.dbc -\n"
        "  battery-agent decode --protocol jbd uart-capture.hex",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--protocol", required=True, choices=("gbt27930", "dbc", "jbd", "daly"))
    d.add_argument("--dbc", help="the DBC file (for --protocol dbc)")
    d.add_argument("file", nargs="?", default="-", help="the capture (default: stdin)")
    d.set_defaults(func=decode)
