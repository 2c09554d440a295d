"""``battery-agent``: the edge agent's command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from protocol import battery_code, keys
from protocol.settings import ConfigError

OK, INVALID, USAGE = 0, 1, 2

EXAMPLES = """
examples:
  battery-agent keygen --out /var/lib/battery-agent/device.key
  battery-agent pubkey --key /var/lib/battery-agent/device.key --pem
  battery-agent code 0RJPEA00HAU0AAG1C3000123
  scanner-output | battery-agent code -
  battery-agent decode --protocol gbt27930 charge-session.log
  battery-agent run -c /etc/battery-agent/agent.toml
"""


def _keygen(args: argparse.Namespace) -> int:
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


def _pubkey(args: argparse.Namespace) -> int:
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


def _code(args: argparse.Namespace) -> int:
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


def _decode(args: argparse.Namespace) -> int:
    from agent import offline_decode
    from agent.decoders.dbc import DbcError

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


def _run(args: argparse.Namespace) -> int:
    from agent import app, config  # the runtime's dependencies are only needed to run

    try:
        cfg = config.load(Path(args.config))
        keys.load_private(cfg.key_path)
    except (ConfigError, keys.InvalidKey) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    asyncio.run(app.run(cfg))
    return OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="battery-agent",
        description="Edge agent of battery-trace: reads batteries, seals signed lifecycle events, delivers them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    k.set_defaults(func=_keygen)

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
    pk.set_defaults(func=_pubkey)

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
    c.set_defaults(func=_code)

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
    d.set_defaults(func=_decode)

    r = sub.add_parser(
        "run",
        help="run the agent",
        description="Run the agent with a TOML config (see configs/agent-*.toml).",
        epilog="example:\n  battery-agent run -c /etc/battery-agent/agent.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("-c", "--config", required=True, help="the agent's TOML config")
    r.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
