"""``emit``: seal lifecycle events given on the command line or in a file, and deliver them."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from battery_trace.agent.cli.common import INVALID, OK, USAGE
from battery_trace.protocol import keys
from battery_trace.protocol.events import EVENT_TYPES, SOURCES

from battery_trace.settings import ConfigError

if TYPE_CHECKING:
    from battery_trace.agent.config import AgentConfig

RAW = argparse.RawDescriptionHelpFormatter


async def deliver(cfg: AgentConfig, timeout_s: float) -> bool:
    """Publish the outbox until a receipt covers all of it, or the time is up."""
    from battery_trace.agent.outbox import Outbox
    from battery_trace.agent.uplink import Uplink

    outbox = Outbox(cfg.outbox_path)
    key = keys.load_private(cfg.key_path)
    # The device's own client id (its certificate allows no other), without a persistent session: an
    # agent running on this device is disconnected while this delivers and loses the receipts queued
    # for it (it resends, so they are delayed, not lost); `emit --no-wait` leaves the delivery to it.
    settings = dataclasses.replace(cfg.mqtt, session_expiry_s=0, resend_after_s=min(cfg.mqtt.resend_after_s, 5.0))
    uplink = Uplink(settings, outbox, cfg.device, key.public.kid, cfg.server_key)
    task = asyncio.create_task(uplink.run(cfg.status_interval_s))
    deadline = time.monotonic() + timeout_s
    try:
        while outbox.depth()[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return outbox.depth()[0] == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        outbox.close()


def emit(args: argparse.Namespace) -> int:
    from battery_trace.agent import config
    from battery_trace.agent import emit as parsing
    from battery_trace.agent.outbox import Outbox, OutboxError
    from battery_trace.agent.sealer import Refused, Sealer

    try:
        cfg = config.load(Path(args.config))
        key = keys.load_private(cfg.key_path)
    except (ConfigError, keys.InvalidKey) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    now_ms = int(time.time() * 1000)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            print(f"error: cannot read {path}", file=sys.stderr)
            return USAGE
        results = list(parsing.from_file(path, args.source or "file", now_ms))
    elif args.type:
        results = [parsing.from_arguments(args.type, args.field, args.source or "manual", args.time, now_ms)]
    else:
        print(
            "error: give an event TYPE with --field NAME=VALUE..., or --file events.jsonl|events.csv", file=sys.stderr
        )
        return USAGE
    problems = [e for r in results if isinstance(r, list) for e in r]
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"nothing sealed: {len(problems)} problem(s) in {len(results)} event(s)", file=sys.stderr)
        return INVALID
    try:
        outbox = Outbox(cfg.outbox_path)
    except OutboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    sealer = Sealer(outbox, key, cfg.device, cfg.role)
    try:
        seqs = [sealer.seal(d) for d in results]  # type: ignore[arg-type]
    except Refused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return INVALID
    except OutboxError as exc:
        done = f"; the first {sealer.sealed} were sealed and stay" if sealer.sealed else "; nothing sealed"
        print(f"error: {exc}{done}", file=sys.stderr)
        return USAGE
    finally:
        outbox.close()
    print(f"sealed {len(seqs)} event(s) as seq {seqs[0]}..{seqs[-1]}")
    if args.no_wait:
        return OK
    if asyncio.run(deliver(cfg, args.timeout)):
        print("delivered: the server's receipt covers them")
        return OK
    print(f"not yet receipted after {args.timeout:g} s; they stay sealed and are sent by the next run", file=sys.stderr)
    return INVALID


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "emit",
        help="seal and send lifecycle events given by hand or in a file",
        description="For the roles without sensors (manufacturer, vehicle maker, scrapper, recycler, repurposer): "
        "seal lifecycle events and deliver them. Values are converted by field (numbers, ISO times, "
        "comma-separated codes, JSON objects for health and materials) and validated; every problem is reported "
        "with its line and field, and a file is sealed all or nothing. Exit 0 when delivered (or sealed, with "
        "--no-wait), 1 when invalid or not receipted in time, 2 on usage errors.",
        epilog="examples:\n"
        "  battery-agent emit produced --field code=0RJPEA00HAU0AAG1C3000123 --field chemistry=ncm \\\n"
        "      --field rated_capacity_ah=150 --field rated_energy_kwh=52.5 -c mfr.toml\n"
        "  battery-agent emit recycled --field code=0RJPEA00HAU0AAG1C3000123 --field mass_kg=310 \\\n"
        '      --field \'materials={"li": 4.2, "co": 3.1}\' -c recycler.toml\n'
        "  battery-agent emit --file production-day.csv -c mfr.toml",
        formatter_class=RAW,
    )
    e.add_argument("type", nargs="?", choices=list(EVENT_TYPES), help="the event type")
    e.add_argument("--field", action="append", default=[], metavar="NAME=VALUE", help="a field of the event")
    e.add_argument("--time", help="when it happened (ISO 8601; default: now)")
    e.add_argument("--source", choices=list(SOURCES), help="where the identity came from (default: manual, or file)")
    e.add_argument("--file", help="events as JSON lines (.jsonl) or CSV with a header row (.csv)")
    e.add_argument("--no-wait", action="store_true", help="only seal; a running agent on this device delivers")
    e.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the receipt (default: %(default)s)")
    e.add_argument("-c", "--config", required=True, help="the agent's TOML config (device, key, server, broker)")
    e.set_defaults(func=emit)
