"""``keygen``, ``pubkey`` and ``code``: the device's key, and checking battery labels."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from battery_trace.agent.cli.common import INVALID, OK, USAGE
from battery_trace.protocol import battery_code, keys


def keygen(args: argparse.Namespace) -> int:
    out = Path(args.out)
    public_path = out.with_suffix(".pub")
    if public_path.exists():
        print(f"error: {public_path} already exists; refusing to overwrite", file=sys.stderr)
        return USAGE
    key = keys.generate()
    try:
        keys.save_private(key, out)
    except keys.InvalidKey as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    public_path.write_text(key.public.pem())
    info = {
        "private_key": str(out),
        "public_key_file": str(public_path),
        "public_key": key.public.hex,
        "kid": key.public.kid.hex(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"private key  {out} (mode 0600; keep it on this device)")
        print(f"public key   {public_path}")
        print(f"             {key.public.hex}")
        print(f"key id       {info['kid']}")
        print(f"enrol it on the server:  battery-server devices enroll DEVICE --role ROLE --key {key.public.hex}")
    return OK


def pubkey(args: argparse.Namespace) -> int:
    try:
        public = keys.load_private(Path(args.key)).public
    except keys.InvalidKey as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    if args.json:
        print(json.dumps({"public_key": public.hex, "kid": public.kid.hex(), "pem": public.pem()}))
    else:
        print(public.pem() if args.pem else public.hex)
    return OK


def code(args: argparse.Namespace) -> int:
    codes = args.codes
    if codes == ["-"]:
        codes = [line for line in sys.stdin.read().splitlines() if line.strip()]
    status = OK
    for text in codes:
        try:
            parsed = battery_code.parse(text)
        except battery_code.CodeError as exc:
            status = INVALID
            result: dict[str, object] = {
                "input": text,
                "valid": False,
                "error": {
                    "position": exc.position,
                    "rule": exc.rule,
                    "valid": exc.valid,
                    "message": str(exc),
                },
            }
            print(f"{text.strip()!r}: {exc}", file=sys.stderr)
        else:
            result = {"input": text, "valid": True, **parsed.to_json()}
        print(json.dumps(result, ensure_ascii=False, indent=2 if args.pretty else None))
    return status


def register(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser(
        "keygen",
        help="generate this device's signing key",
        description="Generate an Ed25519 key from the OS RNG: PKCS#8 PEM at --out (mode 0600, never "
        "overwritten) and the public key beside it (.pub).",
        epilog="example:\n  battery-agent keygen --out /var/lib/battery-agent/device.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument("--out", default="device.key", help="private key file to create (default: %(default)s)")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.set_defaults(func=keygen)

    pk = sub.add_parser(
        "pubkey",
        help="print the public half of this device's key",
        description="Print the public key of a private key file: 64 hex characters (default), PEM, or JSON "
        "with the key id. This is what the server enrols.",
        epilog="example:\n  battery-agent pubkey --key /var/lib/battery-agent/device.key --pem > device.pub",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pk.add_argument("--key", default="device.key", help="private key file (default: %(default)s)")
    pk_format = pk.add_mutually_exclusive_group()
    pk_format.add_argument("--pem", action="store_true", help="print SubjectPublicKeyInfo PEM")
    pk_format.add_argument("--json", action="store_true", help="print hex, key id and PEM as JSON")
    pk.set_defaults(func=pubkey)

    c = sub.add_parser(
        "code",
        help="check GB/T 34014 battery codes",
        description="Parse and validate battery codes; print each one's fields as JSON (one object per "
        "line). Exit 0 when all are valid, 1 when any is invalid (reason on stderr), 2 on usage errors.",
        epilog="examples:\n  battery-agent code 0RJPEA00HAU0AAG1C3000123\n  battery-agent code - < scanned.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("codes", nargs="+", metavar="CODE", help="codes to check, or - to read one per line from stdin")
    c.add_argument("--pretty", action="store_true", help="indent the JSON")
    c.set_defaults(func=code)
