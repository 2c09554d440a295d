"""``battery-server``: the collector, the registry and the record's tools."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import string
import sys
import threading
import time
from pathlib import Path
from typing import Any

from protocol import cbor, envelope, events, keys
from protocol.bounded_read import UnreadableInput, read_bounded
from protocol.settings import ConfigError

OK, INVALID, USAGE = 0, 1, 2
MAX_INPUT = 16 * 1024 * 1024

EXAMPLES = """
examples:
  battery-server pubkey                      # the key agents verify receipts with
  battery-server devices enroll station-1 --role swap_operator --key device.pub
  battery-server devices list --json
  battery-server run -c /etc/battery-server/server.toml
  battery-server verify --key device.pub event.cose
  battery-server inspect event.hex
"""

log = logging.getLogger("battery-server")


class UsageError(Exception):
    pass


def _read_input(name: str) -> bytes:
    """Raw COSE bytes or hex text (whitespace ignored), from a file or stdin."""
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


def _payload_json(payload: bytes) -> dict[str, Any]:
    try:
        return {"event": events.decode(payload).to_json()}
    except events.EventError as exc:
        view: dict[str, Any] = {"hex": payload.hex(), "event_errors": [str(e) for e in exc.errors]}
    with contextlib.suppress(cbor.CborError):
        view["cbor"] = envelope.jsonable(cbor.decode(payload))
    return view


def _verify(args: argparse.Namespace) -> int:
    try:
        key = keys.load_public(args.key)
    except keys.InvalidKey as exc:
        raise UsageError(f"--key: {exc}") from None
    data = _read_input(args.file)
    try:
        env = envelope.verify(data, key)
    except envelope.EnvelopeError as exc:
        print(f"invalid ({exc.reason}): {exc}", file=sys.stderr)
        return INVALID
    kid = env.kid.hex() if env.kid else "none"
    print(f"valid signature (alg {envelope.describe(env)['alg']}, kid {kid})", file=sys.stderr)
    try:
        event = events.decode(env.payload)
    except events.EventError:
        sys.stdout.buffer.write(env.payload)
        sys.stdout.flush()
    else:
        print(json.dumps(event.to_json(), ensure_ascii=False, indent=2))
    return OK


def _inspect(args: argparse.Namespace) -> int:
    data = _read_input(args.file)
    try:
        env = envelope.decode(data, max_size=MAX_INPUT)
    except envelope.EnvelopeError as exc:
        print(f"not an envelope ({exc.reason}): {exc}", file=sys.stderr)
        return INVALID
    print(json.dumps({"envelope": envelope.describe(env), "payload": _payload_json(env.payload)}, indent=2))
    return OK


def server_key(path: Path) -> keys.PrivateKey:
    """The server's signing key; created (OS RNG, mode 0600) the first time it is needed."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        keys.save_private(keys.generate(), path)
        log.warning("created the server's signing key at %s", path)
    return keys.load_private(path)


def _config(args: argparse.Namespace) -> Any:
    from server import config

    return config.load(Path(args.config) if args.config else None)


def _pubkey(args: argparse.Namespace) -> int:
    cfg = _config(args)
    public = server_key(cfg.key_path).public
    if args.json:
        print(json.dumps({"public_key": public.hex, "kid": public.kid.hex(), "pem": public.pem()}))
    else:
        print(public.hex)
    return OK


def _enroll(args: argparse.Namespace) -> int:
    from protocol.topics import device_id_problem
    from server.store import StoreError, open_store

    problem = device_id_problem(args.device)
    if problem:
        raise UsageError(f"device id {problem}")
    try:
        public = keys.load_public(args.key)
    except keys.InvalidKey as exc:
        raise UsageError(f"--key: {exc}") from None
    store = open_store(_config(args).store_url)
    try:
        record = store.enroll(args.device, args.role, public, args.org, time.time())
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return INVALID
    finally:
        store.close()
    info = {"device": record.device, "role": record.role, "kid": record.kid.hex(), "public_key": public.hex}
    print(json.dumps(info) if args.json else f"enrolled {record.device} as {record.role}, key {record.kid.hex()}")
    return OK


def _list(args: argparse.Namespace) -> int:
    from server.store import open_store

    store = open_store(_config(args).store_url)
    try:
        rows = store.devices()
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return OK
    print(f"{'DEVICE':<24} {'ROLE':<14} {'KEY ID':<33} {'STATE':<8} {'WATERMARK':>9} {'EVENTS':>7}")
    for r in rows:
        print(
            f"{r['device']:<24} {r['role']:<14} {r['kid']:<33} {r['key_state']:<8} {r['watermark']:>9} {r['events']:>7}"
        )
    return OK


def _run(args: argparse.Namespace) -> int:
    from server.intake import Collector
    from server.store import open_store

    cfg = _config(args)
    key = server_key(cfg.key_path)
    store = open_store(cfg.store_url)
    collector = Collector(cfg.intake, store, key)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info(
        "server key %s; store %s; broker %s:%s",
        key.public.hex,
        cfg.store_url,
        cfg.intake.host,
        cfg.intake.port,
    )
    collector.start()
    try:
        collector.run(stop)
    finally:
        collector.stop()
        store.close()
        log.info("stopped: %s", dict(collector.counters))
    return OK


def parser() -> argparse.ArgumentParser:
    from protocol.events import ROLES

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="server TOML config (default: the embedded store in $BT_HOME)")

    p = argparse.ArgumentParser(
        prog="battery-server",
        description="Server of battery-trace: verifies signed lifecycle events, keeps the record, answers for it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    v = sub.add_parser(
        "verify",
        help="check the signature of a COSE_Sign1 envelope",
        description="Verify a tagged COSE_Sign1 (EdDSA/Ed25519) from any RFC 9052 implementation. Prints the "
        "payload as JSON when it is a battery-trace event, else the payload bytes. Exit 0 valid, 1 invalid "
        "(reason on stderr), 2 usage error.",
        epilog="examples:\n  battery-server verify --key d75a98...511a event.cose\n"
        "  xxd -p event.cose | battery-server verify --key device.pub -",
        formatter_class=raw,
    )
    v.add_argument("--key", required=True, help="public key: 64 hex characters or a PEM file")
    v.add_argument("file", nargs="?", default="-", help="raw COSE bytes or hex text (default: stdin)")
    v.set_defaults(func=_verify)

    i = sub.add_parser(
        "inspect",
        help="decode an envelope without verifying it",
        description="Show an envelope's headers and payload as JSON, without checking the signature. "
        "Exit 0 when it decodes, 1 when it is not an envelope, 2 on usage errors.",
        epilog="example:\n  battery-server inspect event.hex",
        formatter_class=raw,
    )
    i.add_argument("file", nargs="?", default="-", help="raw COSE bytes or hex text (default: stdin)")
    i.set_defaults(func=_inspect)

    k = sub.add_parser(
        "pubkey",
        parents=[common],
        help="print the server's public key (agents verify receipts with it)",
        description="Print the server's receipt-signing public key; the key is created on first use.",
        epilog="example:\n  battery-server pubkey > server.pub.hex",
        formatter_class=raw,
    )
    k.add_argument("--json", action="store_true", help="also print the key id and PEM, as JSON")
    k.set_defaults(func=_pubkey)

    d = sub.add_parser("devices", help="the registry of devices and their keys")
    dsub = d.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    e = dsub.add_parser(
        "enroll",
        parents=[common],
        help="enrol a device with its role and public key",
        description="Enrol DEVICE: its role decides which event types it may sign. The key must be a sound "
        "Ed25519 public key (64 hex characters or a PEM file).",
        epilog="example:\n  battery-server devices enroll station-1 --role swap_operator --key device.pub",
        formatter_class=raw,
    )
    e.add_argument("device")
    e.add_argument("--role", required=True, choices=ROLES)
    e.add_argument("--key", required=True, help="public key: 64 hex characters or a PEM file")
    e.add_argument("--org", help="the organisation operating the device")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_enroll)
    lst = dsub.add_parser("list", parents=[common], help="list enrolled devices and their chains")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)

    r = sub.add_parser(
        "run",
        parents=[common],
        help="run the collector",
        description="Subscribe to every device's events, verify, store, acknowledge and send receipts.",
        epilog="example:\n  battery-server run -c configs/server.toml",
        formatter_class=raw,
    )
    r.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, ConfigError, keys.InvalidKey) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
