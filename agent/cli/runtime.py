"""``run``, ``status`` and ``confirm``: the agent itself, what it says about itself, and a technician's
confirmation at a maintenance rig (sent to the running agent's loopback endpoint)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from battery_trace.agent.cli.common import INVALID, OK, USAGE
from battery_trace.protocol import keys
from battery_trace.protocol.events import MAINTENANCE_ACTIONS

from battery_trace.settings import ConfigError

RAW = argparse.RawDescriptionHelpFormatter


def load(args: argparse.Namespace) -> Any:
    from battery_trace.agent import config

    return config.load(Path(args.config))


def run(args: argparse.Namespace) -> int:
    from battery_trace.agent import app  # the runtime's dependencies are only needed to run
    from battery_trace.agent.control import SecretError
    from battery_trace.agent.outbox import OutboxError

    try:
        cfg = load(args)
        keys.load_private(cfg.key_path)
        asyncio.run(app.run(cfg))
    except (ConfigError, keys.InvalidKey, OutboxError, SecretError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    return OK


def _endpoint(cfg: Any, path: str, body: dict[str, Any] | None = None, secret: str | None = None) -> dict[str, Any]:
    if cfg.control is None:
        raise ConnectionError("the agent's local endpoint is off ([observability] listen = 'off')")
    host, port = cfg.control
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    request = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers=headers,
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
        raise ValueError(detail) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"the agent is not running (no answer on {host}:{port}: {exc})") from None


def _offline_status(cfg: Any) -> dict[str, Any]:
    """What the outbox on disk says when the agent does not answer; OutboxError when it cannot be read."""
    from battery_trace.agent.outbox import OutboxError

    path = cfg.outbox_path
    try:
        path.stat()
    except FileNotFoundError:
        return {"running": False, "outbox": {"depth": 0, "note": f"no outbox at {path} yet"}}
    except OSError as exc:  # a folder on the way is a file, or may not be entered
        raise OutboxError(path, "read it", exc) from None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                # An empty file (made before the first start finished, or by `touch`): nothing sealed yet.
                return {"running": False, "outbox": {"depth": 0, "note": f"the outbox {path} is empty"}}
            depth, oldest = db.execute("SELECT COUNT(*), MIN(sealed_at) FROM outbox").fetchone()
            head = db.execute("SELECT MAX(last_seq) FROM chain").fetchone()[0] or 0
    except sqlite3.Error as exc:
        raise OutboxError(path, "read it (restore it from a backup, or move it aside)", exc) from None
    return {
        "running": False,
        "outbox": {
            "depth": depth,
            "oldest_unreceipted_s": round(time.time() - oldest, 1) if oldest else 0.0,
            "head_seq": head,
        },
    }


def status(args: argparse.Namespace) -> int:
    try:
        cfg = load(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    from battery_trace.agent.outbox import OutboxError

    try:
        report = {"running": True, **_endpoint(cfg, "/status")}
    except ConnectionError as exc:
        try:
            report = {**_offline_status(cfg), "why": str(exc)}
        except OutboxError as error:
            print(f"error: {error}", file=sys.stderr)
            return USAGE
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return OK if report["running"] else INVALID
    out = report["outbox"]
    print(f"agent {cfg.device} ({cfg.site_kind}): {'running' if report['running'] else 'NOT RUNNING'}")
    if not report["running"]:
        print(f"  {report['why']}")
    print(
        f"  outbox: {out['depth']} unreceipted, oldest {out.get('oldest_unreceipted_s', 0)} s, "
        f"last sealed seq {out.get('head_seq', 0)}" + (f"; ALARM: {out['alarm']}" if out.get("alarm") else "")
    )
    if report["running"]:
        print(f"  broker: {'connected' if report['uplink']['connected'] else 'NOT CONNECTED'}")
        for slot, s in report["slots"].items():
            age = f"{time.time() - s['seen_at']:.0f} s ago" if s["seen_at"] else "never"
            health = ", ".join(f"{k} {v}" for k, v in s["health"].items() if not isinstance(v, list))
            print(
                f"  slot {slot}: {s['code'] or 'unknown battery'} ({s['code_source'] or '-'}), last reading {age}: "
                f"{health or 'no health yet'}"
            )
        for src in report["sources"]:
            bad = {k: v for k, v in src["counters"].items() if k != "frames" and k != "connects"}
            print(
                f"  source {src['name']} (slot {src['slot']}): {'up' if src['connected'] else 'DOWN'}, "
                f"{src['counters'].get('frames', 0)} frames" + (f", {bad}" if bad else "")
            )
    return OK if report["running"] else INVALID


def confirm(args: argparse.Namespace) -> int:
    if args.replace_with and not args.vin:
        print("error: --replace-with needs --vin (the vehicle the pack was replaced in)", file=sys.stderr)
        return USAGE
    if args.replace_with:
        line = f"REPLACE {args.replace_with} {args.vin} {args.note or ''}"
    elif args.action:
        line = f"CONFIRM {args.action} {args.note or ''}"
    else:
        print("error: give an ACTION, or --replace-with CODE --vin VIN", file=sys.stderr)
        return USAGE
    from battery_trace.agent.control import SecretError, read_secret

    try:
        cfg = load(args)
        secret = read_secret(cfg.control_secret)
    except (ConfigError, SecretError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    try:
        answer = _endpoint(cfg, "/confirm", {"line": line.strip()}, secret)
    except (ConnectionError, ValueError) as exc:
        print(f"not sealed: {exc}", file=sys.stderr)
        return INVALID
    if answer.get("held"):
        # Taken and kept by the agent: a second confirmation would become a second event.
        print(
            f"accepted, NOT SEALED YET: {answer['held']}; it is sealed once the outbox can be written "
            "(do not confirm it again)",
            file=sys.stderr,
        )
        return OK
    print(f"sealed as seq {answer['sealed']}")
    return OK


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="run the agent",
        description="Run the agent with a TOML config (see configs/agent-*.toml). Stops cleanly on SIGTERM.",
        epilog="example:\n  battery-agent run -c /etc/battery-agent/agent.toml",
        formatter_class=RAW,
    )
    r.add_argument("-c", "--config", required=True, help="the agent's TOML config")
    r.set_defaults(func=run)

    s = sub.add_parser(
        "status",
        help="outbox, broker, slots and sources of the running agent",
        description="Ask the running agent (its loopback endpoint) how it is; when it does not answer, show what "
        "its outbox on disk holds. Exit 0 when it is running, 1 when it is not.",
        epilog="example:\n  battery-agent status -c /etc/battery-agent/agent.toml --json",
        formatter_class=RAW,
    )
    s.add_argument("-c", "--config", required=True, help="the agent's TOML config")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=status)

    c = sub.add_parser(
        "confirm",
        help="a technician confirms a service action at a maintenance rig",
        description="Seal a 'maintenance' event for the pack connected to the rig (ACTION), or a 'replaced' "
        "event when it was replaced in a vehicle by another pack. It shows the running agent the install's "
        "control secret ([observability] secret_file, made by `battery-agent run`). Exit 0 when sealed (or "
        "accepted and held while the outbox's disk is full: do not repeat it), 1 when the agent refused (reason "
        "on stderr), 2 on usage or configuration errors.",
        epilog="examples:\n  battery-agent confirm rebalance --note 'cell 12 low' -c rig.toml\n"
        "  battery-agent confirm --replace-with 0RJPEA00HAU0AAG1C3000124 --vin LNBSCB3F1PW123456 -c rig.toml",
        formatter_class=RAW,
    )
    c.add_argument("action", nargs="?", choices=MAINTENANCE_ACTIONS)
    c.add_argument("--note", help="findings, or the reason for a replacement")
    c.add_argument("--replace-with", metavar="CODE", help="the pack that replaced the connected one")
    c.add_argument("--vin", help="the vehicle, for a replacement")
    c.add_argument("-c", "--config", required=True, help="the agent's TOML config")
    c.set_defaults(func=confirm)
