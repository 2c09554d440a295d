"""``pki``: the site CA and the TLS certificates of the broker, devices and collectors."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from battery_trace.server.cli.common import INVALID, OK
from battery_trace.server.pki import LEAF_DAYS, RENEW_DAYS, Kind, Pki, PkiError

EXAMPLES = """
examples:
  battery-server pki init --site "Shenzhen swap network"
  battery-server pki broker --host broker.example.net --host 10.0.0.5
  battery-server pki collector bt-collector-1
  battery-server pki device station-1        # copy ca.pem and issued/station-1.* to the device; restart the broker
  battery-server pki revoke station-1        # then: kill -HUP the broker (CRL), or restart it (CRL and topics)
  battery-server pki list --json

The broker config that uses these files is configs/mosquitto-tls.conf.
"""


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if not 1 <= days <= 36500:
        raise argparse.ArgumentTypeError(f"{text!r} is not a validity in days; valid: 1..36500")
    return days


def _pki(args: argparse.Namespace) -> Pki:
    if args.dir:
        return Pki(Path(args.dir))
    from battery_trace.server.config import home

    return Pki(home() / "pki")


Result = dict[str, Any]  # {"json": what --json prints, "text": what a person reads}


def _call(args: argparse.Namespace, action: Callable[[Pki], Result]) -> int:
    try:
        result = action(_pki(args))
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return INVALID
    print(json.dumps(result["json"], indent=2) if args.json else result["text"])
    return OK


def init(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        pki.init(args.site)
        return {
            "json": {"ca": str(pki.ca_cert_path), "crl": str(pki.crl_path), "access": str(pki.access_path)},
            "text": f"site CA created in {pki.folder} (ca.pem to share; ca.key stays here, mode 0600)",
        }

    return _call(args, action)


def issue(kind: Kind) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        name = "broker" if kind == "broker" else args.name
        hosts = tuple(args.host) if kind == "broker" else ()

        def action(pki: Pki) -> Result:
            cert, key = pki.issue(name, kind, hosts, args.days)
            return {
                "json": {
                    "name": name,
                    "kind": kind,
                    "certificate": str(cert),
                    "key": str(key),
                    "ca": str(pki.ca_cert_path),
                },
                "text": f"{kind} certificate {cert}\n{kind} key         {key} (mode 0600)"
                + ("" if kind == "broker" else f"\nrestart the broker: it reads {pki.access_path} only at start"),
            }

        return _call(args, action)

    return handler


def revoke(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        revoked = pki.revoke(args.name)
        serials = ", ".join(f"{i.serial:x}" for i in revoked)
        return {
            "json": {"revoked": [i.__dict__ for i in revoked], "crl": str(pki.crl_path)},
            "text": f"revoked {args.name} (serial {serials}); {pki.crl_path} and {pki.access_path} rewritten:\n"
            "reload the broker (kill -HUP) so it refuses the certificate; a restart also drops its topics",
        }

    return _call(args, action)


def crl(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        pki.write_crl()
        return {"json": {"crl": str(pki.crl_path)}, "text": f"re-signed {pki.crl_path}"}

    return _call(args, action)


CRL_METRIC = "bt_pki_crl_next_update_timestamp_seconds"


def renew_crl(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        renewed, next_update = pki.renew_crl(args.within)
        if args.metrics_file:
            _write_metric(Path(args.metrics_file), next_update.timestamp())
        what = "re-signed" if renewed else f"more than {args.within} days left on"
        reload = "; reload the broker (kill -HUP) so it reads it" if renewed else ""
        return {
            "json": {"crl": str(pki.crl_path), "renewed": renewed, "next_update": next_update.isoformat()},
            "text": f"{what} {pki.crl_path}: valid until {next_update.isoformat()}{reload}",
        }

    return _call(args, action)


def _write_metric(path: Path, next_update: float) -> None:
    """For node_exporter's textfile collector: written aside and renamed, so a scrape never reads half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(
        f"# HELP {CRL_METRIC} When the broker's CRL expires; past it, the broker refuses every client.\n"
        f"# TYPE {CRL_METRIC} gauge\n{CRL_METRIC} {next_update:.0f}\n"
    )
    partial.replace(path)


def list_certs(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        index = pki.index()
        rows = [f"{'NAME':<28} {'KIND':<10} {'SERIAL':<42} {'EXPIRES (UTC)':<26} REVOKED"]
        rows += [f"{i.name:<28} {i.kind:<10} {i.serial:<42x} {i.not_after:<26} {i.revoked_at or '-'}" for i in index]
        return {"json": [i.__dict__ for i in index], "text": "\n".join(rows)}

    return _call(args, action)


def register(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "pki",
        help="the site CA and TLS certificates for the broker, devices and collectors",
        description="Issue the transport certificates of a site: a CA, the broker's server certificate, one "
        "client certificate per device and per collector (its common name is the device id or collector id "
        "the broker's access rules match), the CRL and the broker's access rules (dynamic-security.json). "
        "Exit 0 done, 1 refused (the reason on stderr), 2 usage error.",
        epilog=EXAMPLES,
        formatter_class=raw,
    )
    psub = p.add_subparsers(dest="pki_command", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dir", help="the PKI folder (default: $BT_HOME/pki)")
        q.add_argument("--json", action="store_true", help="print the result as JSON")

    i = psub.add_parser("init", help="create the site CA", epilog=EXAMPLES, formatter_class=raw)
    i.add_argument("--site", required=True, help="the organisation or site name written into the CA")
    common(i)
    i.set_defaults(func=init)

    b = psub.add_parser("broker", help="issue the broker's server certificate", epilog=EXAMPLES, formatter_class=raw)
    b.add_argument("--host", action="append", required=True, help="a DNS name or IP address clients dial (repeat)")
    b.add_argument("--days", type=_days, default=LEAF_DAYS, help=f"validity in days (default {LEAF_DAYS})")
    common(b)
    b.set_defaults(func=issue("broker"))

    for kind, what in (
        ("device", "a device (the name is its device id)"),
        ("collector", "a collector (its client id)"),
    ):
        q = psub.add_parser(kind, help=f"issue a client certificate for {what}", epilog=EXAMPLES, formatter_class=raw)
        q.add_argument("name")
        q.add_argument("--days", type=_days, default=LEAF_DAYS, help=f"validity in days (default {LEAF_DAYS})")
        common(q)
        q.set_defaults(func=issue(kind))  # type: ignore[arg-type]

    r = psub.add_parser("revoke", help="revoke a name's certificates (the CRL and the access rules are rewritten)")
    r.add_argument("name")
    common(r)
    r.set_defaults(func=revoke)

    c = psub.add_parser("crl", help="re-sign the CRL before its next-update time runs out")
    common(c)
    c.set_defaults(func=crl)

    rc = psub.add_parser(
        "renew-crl",
        help="re-sign the CRL when it expires soon (for a timer: configs/battery-pki-renew-crl.timer)",
        description="Re-sign the CRL when fewer than --within days are left before its next update (the broker "
        "refuses every client once it has passed), and optionally write its expiry as a Prometheus metric. "
        "Exit 0 whether or not it was re-signed; after a renewal, reload the broker (kill -HUP).",
    )
    rc.add_argument("--within", type=_days, default=RENEW_DAYS, help=f"days left that renew it (default {RENEW_DAYS})")
    rc.add_argument("--metrics-file", help=f"write {CRL_METRIC} here (node_exporter's textfile collector)")
    common(rc)
    rc.set_defaults(func=renew_crl)

    lst = psub.add_parser("list", help="every certificate issued, and whether it is revoked")
    common(lst)
    lst.set_defaults(func=list_certs)
