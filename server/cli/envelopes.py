"""``verify`` and ``inspect``: check or look into any COSE_Sign1, with no store and no registry."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from battery_trace.protocol import cbor, envelope, events, keys
from battery_trace.server.cli.common import INVALID, OK, UsageError, print_json, read_input


def payload_view(payload: bytes) -> dict[str, Any]:
    try:
        return {"event": events.decode(payload).to_json()}
    except events.EventError as exc:
        view: dict[str, Any] = {"hex": payload.hex(), "event_errors": [str(e) for e in exc.errors]}
    with contextlib.suppress(cbor.CborError):  # not CBOR at all: the hex says enough
        view["cbor"] = envelope.jsonable(cbor.decode(payload))
    return view


def verify(args: argparse.Namespace) -> int:
    try:
        key = keys.load_public(args.key)
    except keys.InvalidKey as exc:
        raise UsageError(f"--key: {exc}") from None
    data = read_input(args.file)
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


def inspect(args: argparse.Namespace) -> int:
    data = read_input(args.file)
    try:
        env = envelope.decode(data, max_size=len(data), canonical=False)  # any COSE_Sign1, as it came
    except envelope.EnvelopeError as exc:
        print(f"not an envelope ({exc.reason}): {exc}", file=sys.stderr)
        return INVALID
    print_json({"envelope": envelope.describe(env), "payload": payload_view(env.payload)})
    return OK


def register(sub: argparse._SubParsersAction) -> None:
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
    v.set_defaults(func=verify)

    i = sub.add_parser(
        "inspect",
        help="decode an envelope without verifying it",
        description="Show an envelope's headers and payload as JSON, without checking the signature. "
        "Exit 0 when it decodes, 1 when it is not an envelope, 2 on usage errors.",
        epilog="example:\n  battery-server inspect event.hex",
        formatter_class=raw,
    )
    i.add_argument("file", nargs="?", default="-", help="raw COSE bytes or hex text (default: stdin)")
    i.set_defaults(func=inspect)
