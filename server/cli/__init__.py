"""``battery-server``: the collector, the registry and the record's tools."""

from __future__ import annotations

import argparse
import logging
import sys

from battery_trace.protocol import keys
from battery_trace.server.cli import envelopes, first_run, pki, record, registry, run
from battery_trace.server.cli.common import USAGE, Parser, UsageError, config, corrupt_record

from battery_trace.settings import ConfigError

EXAMPLES = """
examples:
  battery-server init                        # once: the server's signing key and dashboard token
  battery-server pubkey                      # the key agents verify receipts with
  battery-server devices enroll station-1 --role swap_operator --key device.pub
  battery-server run -c /etc/battery-server/server.toml
  battery-server trace 0RJPEA00HAU0AAG1C3000123
  battery-server findings --open
  battery-server audit station-1
  battery-server verify --key device.pub event.cose
  battery-server pki init --site "Shenzhen swap network"
"""


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="battery-server",
        description="Server of battery-trace: verifies signed lifecycle events, keeps the record, answers for it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (first_run, run, registry, record, envelopes, pki):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from battery_trace.server.store import StoreUnavailable

    try:
        return args.func(args)
    except (UsageError, ConfigError, keys.InvalidKey) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if not corrupt_record(exc):
            raise
        # Not an outage to wait out: the file itself is damaged, and only a person can restore it.
        print(
            f"error: the record {config(args).store_shown} is not a sound SQLite database ({exc}); "
            "restore it from a backup (docs/operator-guide.md, Back up and restore)",
            file=sys.stderr,
        )
        return USAGE


if __name__ == "__main__":
    sys.exit(main())
