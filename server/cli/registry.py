"""``pubkey`` and ``devices``: the server's own key, and the registry of devices and their keys."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from battery_trace.protocol import keys
from battery_trace.protocol.events import ROLES
from battery_trace.protocol.topics import device_id_problem
from battery_trace.server.cli.common import (
    INVALID,
    OK,
    UsageError,
    add_config,
    add_json,
    config,
    iso,
    open_store,
    parse_time,
)
from battery_trace.server.records import KeyRecord

if TYPE_CHECKING:
    from battery_trace.server.store import Store

log = logging.getLogger("battery-server")


def server_key(path: Path) -> keys.PrivateKey:
    """The server's signing key; created (OS RNG, mode 0600) the first time it is needed."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        keys.save_private(keys.generate(), path)
        log.warning("created the server's signing key at %s", path)
    return keys.load_private(path)


def pubkey(args: argparse.Namespace) -> int:
    public = server_key(config(args).key_path).public
    if args.json:
        print(json.dumps({"public_key": public.hex, "kid": public.kid.hex(), "pem": public.pem()}))
    else:
        print(public.hex)
    return OK


def _public(spec: str) -> keys.PublicKey:
    try:
        return keys.load_public(spec)
    except keys.InvalidKey as exc:
        raise UsageError(f"--key: {exc}") from None


def _key_json(record: KeyRecord) -> dict[str, object]:
    return {
        "device": record.device,
        "role": record.role,
        "kid": record.kid.hex(),
        "public_key": record.public.hex,
        "state": record.state,
        "valid_from": record.valid_from,
        "valid_until": record.valid_until,
        "revoked_at": record.revoked_at,
    }


def _registry_call(args: argparse.Namespace, action: Callable[[Store], dict[str, Any]]) -> int:
    from battery_trace.server.store import StoreError

    store = open_store(args)
    try:
        result = action(store)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return INVALID
    finally:
        store.close()
    print(json.dumps(result["json"], indent=2) if args.json else result["text"])
    return OK


def enroll(args: argparse.Namespace) -> int:
    problem = device_id_problem(args.device)
    if problem:
        raise UsageError(f"device id {problem}")
    public = _public(args.key)

    def action(store: Store) -> dict[str, Any]:
        r = store.enroll(args.device, args.role, public, args.org, time.time())
        return {"json": _key_json(r), "text": f"enrolled {r.device} as {r.role}, key {r.kid.hex()}"}

    return _registry_call(args, action)


def rotate(args: argparse.Namespace) -> int:
    public = _public(args.key)

    def action(store: Store) -> dict[str, Any]:
        r = store.rotate(args.device, public, time.time())
        return {
            "json": _key_json(r),
            "text": f"{r.device} now signs with key {r.kid.hex()}; earlier keys are retired as of now",
        }

    return _registry_call(args, action)


def revoke(args: argparse.Namespace) -> int:
    at = args.at if args.at is not None else time.time()

    def action(store: Store) -> dict[str, Any]:
        revoked, flagged = store.revoke(args.target, at)
        lines = [f"revoked key {r.kid.hex()} of {r.device} from {iso(at)} UTC" for r in revoked]
        if flagged:
            lines.append(f"{flagged} stored events arrived after that time and are now flagged (revoked_key)")
        return {
            "json": {"revoked": [_key_json(r) for r in revoked], "flagged_events": flagged},
            "text": "\n".join(lines),
        }

    return _registry_call(args, action)


def list_devices(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        rows = store.devices()
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return OK
    print(f"{'DEVICE':<24} {'ROLE':<14} {'KEY ID':<33} {'STATE':<8} {'WATERMARK':>9} {'MAX SEQ':>8}  LAST SEEN (UTC)")
    for r in rows:
        print(
            f"{r['device']:<24} {r['role']:<14} {r['kid']:<33} {r['key_state']:<8} "
            f"{r['watermark']:>9} {r['max_seq']:>8}  {iso(r['last_seen'])}"
        )
    return OK


def register(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    k = sub.add_parser(
        "pubkey",
        help="print the server's public key (agents verify receipts with it)",
        description="Print the server's receipt-signing public key; the key is created on first use.",
        epilog="example:\n  battery-server pubkey > server.pub.hex",
        formatter_class=raw,
    )
    add_config(k)
    add_json(k, "also print the key id and PEM, as JSON")
    k.set_defaults(func=pubkey)

    d = sub.add_parser("devices", help="the registry of devices and their keys")
    dsub = d.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    e = dsub.add_parser(
        "enroll",
        help="enrol a device with its role and public key",
        description="Enrol DEVICE: its role decides which event types it may sign. The key must be a sound "
        "Ed25519 public key (64 hex characters or a PEM file). Exit 1 when the registry refuses.",
        epilog="example:\n  battery-server devices enroll station-1 --role swap_operator --key device.pub",
        formatter_class=raw,
    )
    e.add_argument("device")
    e.add_argument("--role", required=True, choices=ROLES)
    e.add_argument("--key", required=True, help="public key: 64 hex characters or a PEM file")
    e.add_argument("--org", help="the organisation operating the device")
    add_config(e)
    add_json(e)
    e.set_defaults(func=enroll)

    r = dsub.add_parser(
        "rotate",
        help="give a device a new key; its current key is retired",
        description="The new key is active from now. Events the old key sealed before now are still accepted "
        "when they arrive; later ones are refused (key_not_active).",
        epilog="example:\n  battery-server devices rotate station-1 --key new-device.pub",
        formatter_class=raw,
    )
    r.add_argument("device")
    r.add_argument("--key", required=True, help="the new public key: 64 hex characters or a PEM file")
    add_config(r)
    add_json(r)
    r.set_defaults(func=rotate)

    v = dsub.add_parser(
        "revoke",
        help="stop trusting a device's keys, or one key",
        description="Revoke every key of DEVICE, or the key KEYID (hex). From --at on (default: now) nothing the "
        "key signs is accepted; with --at in the past, events already stored since then are flagged.",
        epilog="examples:\n  battery-server devices revoke station-1\n"
        "  battery-server devices revoke 9d4341339860df0eacf8dd80f91a4476 --at 2026-11-01T00:00:00Z",
        formatter_class=raw,
    )
    v.add_argument("target", metavar="DEVICE|KEYID")
    v.add_argument("--at", type=parse_time, help="effective time (ISO 8601 or Unix seconds; default: now)")
    add_config(v)
    add_json(v)
    v.set_defaults(func=revoke)

    lst = dsub.add_parser("list", help="list enrolled devices, their keys and chains")
    add_config(lst)
    add_json(lst)
    lst.set_defaults(func=list_devices)
