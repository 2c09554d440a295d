"""``pubkey`` and ``devices``: the server's own key, and the registry of devices and their keys."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
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
    time_arg,
)
from battery_trace.server.cli.first_run import server_key
from battery_trace.server.records import KeyRecord

if TYPE_CHECKING:
    from battery_trace.server.store import Store

REVOKE_AHEAD_S = 366 * 86400  # a revocation scheduled further ahead than a year is a slip, not a plan


def pubkey(args: argparse.Namespace) -> int:
    public = server_key(config(args).key_path, args).public
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
        lines = [
            f"revoked key {r.key.kid.hex()} of {r.key.device} from {iso(at)} UTC"
            + ("" if r.previous is None else f" (moved from {iso(r.previous)} UTC)")
            for r in revoked
        ]
        if flagged:
            lines.append(f"{flagged} stored events arrived after that time and are now flagged (revoked_key)")
        return {
            "json": {
                "revoked": [{**_key_json(r.key), "previous_revoked_at": r.previous} for r in revoked],
                "flagged_events": flagged,
            },
            "text": "\n".join(lines),
        }

    return _registry_call(args, action)


def unrevoke(args: argparse.Namespace) -> int:
    def action(store: Store) -> dict[str, Any]:
        lifted = store.unrevoke(args.target, time.time(), args.in_effect)
        lines = []
        for x in lifted:
            lines.append(f"lifted the revocation of key {x.key.kid.hex()} of {x.key.device} ({iso(x.revoked_at)} UTC)")
            if x.refused or x.flagged:
                lines.append(
                    f"  it was in effect: {x.refused} message(s) refused under it stay in quarantine (the device "
                    f"resends what it still holds), {x.flagged} revoked_key finding(s) stay open for review"
                )
        return {
            "json": {
                "lifted": [
                    {**_key_json(x.key), "lifted_revoked_at": x.revoked_at, "refused": x.refused, "flagged": x.flagged}
                    for x in lifted
                ]
            },
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
        description="Print the server's receipt-signing public key. The key is created once by "
        "`battery-server init`; without it this refuses (exit 2) rather than make a new one.",
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
        "key signs is accepted; with --at in the past, events already stored since then are flagged. On a key "
        "already revoked later than --at, the revocation is moved earlier (a wrong time is corrected this way); "
        "to move one later, lift it first with `devices unrevoke`. Exit 1 when there is nothing to change.",
        epilog="examples:\n  battery-server devices revoke station-1\n"
        "  battery-server devices revoke 9d4341339860df0eacf8dd80f91a4476 --at 2026-11-01T00:00:00Z\n"
        "  battery-server devices revoke station-1 --at 1793491200     # Unix seconds, not milliseconds",
        formatter_class=raw,
    )
    v.add_argument("target", metavar="DEVICE|KEYID")
    v.add_argument(
        "--at",
        type=time_arg(ahead_s=REVOKE_AHEAD_S),
        help="effective time: ISO 8601 with a zone (2026-11-01T08:00:00+08:00), a date (UTC) or Unix seconds "
        "(not milliseconds); from 2000-01-01 to a year from now (default: now)",
    )
    add_config(v)
    add_json(v)
    v.set_defaults(func=revoke)

    u = dsub.add_parser(
        "unrevoke",
        help="lift a wrong revocation of a device's keys, or of one key",
        description="Lift the revocation of every revoked key of DEVICE, or of the key KEYID: the key is active "
        "again (retired, if the device was given a new key meanwhile). A revocation not yet in effect is simply "
        "lifted. One already in effect (messages refused under it, stored events flagged) is lifted only with "
        "--in-effect, and the command says what stays: refused messages stay in quarantine, findings stay open. "
        "Exit 1 when refused or when nothing is revoked.",
        epilog="examples:\n  battery-server devices unrevoke station-1      # a revocation scheduled by mistake\n"
        "  battery-server devices unrevoke station-1 --in-effect   # the wrong device was revoked just now",
        formatter_class=raw,
    )
    u.add_argument("target", metavar="DEVICE|KEYID")
    u.add_argument("--in-effect", action="store_true", help="also lift a revocation that has already taken effect")
    add_config(u)
    add_json(u)
    u.set_defaults(func=unrevoke)

    lst = dsub.add_parser("list", help="list enrolled devices, their keys and chains")
    add_config(lst)
    add_json(lst)
    lst.set_defaults(func=list_devices)
