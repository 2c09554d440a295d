"""``battery-agent``: the edge agent's command line."""

from __future__ import annotations

import argparse
import logging

from battery_trace.agent.cli import bindings, decode, identity, runtime, submit

EXAMPLES = """
examples:
  battery-agent keygen --out /var/lib/battery-agent/device.key
  battery-agent code 0RJPEA00HAU0AAG1C3000123
  battery-agent run -c /etc/battery-agent/agent.toml
  battery-agent status -c /etc/battery-agent/agent.toml
  battery-agent emit --file production-day.csv -c mfr.toml
  battery-agent decode --protocol gbt27930 charge-session.log
  battery-agent bindings list -c /etc/battery-agent/agent.toml
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="battery-agent",
        description="Edge agent of battery-trace: reads batteries, seals signed lifecycle events, delivers them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (runtime, submit, identity, bindings, decode):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
