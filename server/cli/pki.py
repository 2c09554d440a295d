"""``pki``: the site CA and the TLS certificates of the broker, devices and collectors."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from battery_trace.server.cli.common import INVALID, OK
from battery_trace.server.pki import ADMIN, LEAF_DAYS, RENEW_DAYS, Kind, Pki, PkiError, status_name

EXAMPLES = """
examples:
  battery-server pki init --site "Shenzhen swap network"   # then: chown -R mosquitto: DIR/broker
  battery-server pki broker --host broker.example.net --host 10.0.0.5
  battery-server pki collector bt-collector-1              # and bt-collector-1-status, for its dashboard
  battery-server pki device station-1 --broker broker.example.net   # let in at once; copy ca.pem, issued/station-1.*
  battery-server pki revoke station-1 --broker broker.example.net   # cut off at once; then kill -HUP the broker (CRL)
  battery-server pki apply --broker broker.example.net     # the running broker's rules = the files'
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


def _broker(text: str) -> tuple[str, int]:
    from battery_trace.server.broker_control import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _call(args: argparse.Namespace, action: Callable[[Pki], Result]) -> int:
    """Run ACTION on the folder, then, with --broker, apply the access rules to the running broker."""
    try:
        pki = _pki(args)
        result = action(pki)
    except PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return INVALID
    broker = getattr(args, "broker", None)
    applied = _apply(pki, broker) if broker else None
    if applied is not None:
        result["json"] = {**result["json"], "applied": applied}
        result["text"] += "\n" + _applied_text(broker, applied)
    print(json.dumps(result["json"], indent=2) if args.json else result["text"])
    return OK if applied is not None or not broker else INVALID


def _apply(pki: Pki, broker: tuple[str, int]) -> dict[str, list[str]] | None:
    from battery_trace.server.broker_control import apply

    try:
        done = apply(pki, *broker)
    except PkiError as exc:
        print(
            f"error: {exc}\nthe files are written but the running broker is unchanged: restart the broker, "
            f"or run `battery-server pki apply --broker HOST:PORT` once it is reachable",
            file=sys.stderr,
        )
        return None
    return {"created": done.created, "deleted": done.deleted}


def _applied_text(broker: tuple[str, int], applied: dict[str, list[str]]) -> str:
    created = ", ".join(applied["created"]) or "nobody"
    deleted = ", ".join(applied["deleted"]) or "nobody"
    return f"applied to the broker at {broker[0]}:{broker[1]}: let in {created}; cut off {deleted}"


def init(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        pki.init(args.site)
        return {
            "json": {"ca": str(pki.ca_cert_path), "crl": str(pki.crl_path), "access": str(pki.access_path)},
            "text": f"site CA created in {pki.folder} (ca.pem to share; ca.key stays here, mode 0600);\n"
            f"the broker reads {pki.broker_dir} only: hand it to the broker's user (chown -R mosquitto: "
            f"{pki.broker_dir})",
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
                + _status_text(pki, kind, name)
                + _restart_text(pki, kind, args),
            }

        return _call(args, action)

    return handler


def _status_text(pki: Pki, kind: Kind, name: str) -> str:
    if kind != "collector":
        return ""
    status = pki.issued_dir / status_name(name)
    return f"\nits status listener's certificate and key: {status}.pem, {status}.key (kept next to the collector's)"


def _restart_text(pki: Pki, kind: Kind, args: argparse.Namespace) -> str:
    if kind == "broker" or args.broker:
        return ""
    return f"\nnot yet let in: give --broker HOST[:PORT], or restart the broker (it reads {pki.access_path} at start)"


def revoke(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        revoked = pki.revoke(args.name)
        serials = ", ".join(f"{i.name} {i.serial:x}" for i in revoked)
        cut = (
            ""
            if args.broker
            else "; until the broker is given the rules (--broker HOST[:PORT], or a restart) a connected "
            "device goes on publishing"
        )
        return {
            "json": {"revoked": [i.__dict__ for i in revoked], "crl": str(pki.crl_path)},
            "text": f"revoked {serials}; {pki.crl_path} and {pki.access_path} rewritten:\n"
            f"reload the broker (kill -HUP) so it refuses new connections with the certificate{cut}",
        }

    return _call(args, action)


def apply_rules(args: argparse.Namespace) -> int:
    def action(pki: Pki) -> Result:
        if not pki.ca_key_path.exists():  # refused before dialling the broker
            raise PkiError(f"no CA in {pki.folder}; create one with: battery-server pki init --dir {pki.folder}")
        return {"json": {"access": str(pki.access_path)}, "text": f"the rules of {pki.access_path}"}

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

    def broker(q: argparse.ArgumentParser, required: bool = False) -> None:
        q.add_argument(
            "--broker",
            type=_broker,
            required=required,
            metavar="HOST[:PORT]",
            help=f"apply the access rules to this running broker at once, as {ADMIN} (port 8883 unless given); "
            "exit 1 if it cannot be reached (the files are written all the same)",
        )

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
        ("collector", "a collector (its client id), and its status listener (CLIENT_ID-status)"),
    ):
        q = psub.add_parser(kind, help=f"issue a client certificate for {what}", epilog=EXAMPLES, formatter_class=raw)
        q.add_argument("name")
        q.add_argument("--days", type=_days, default=LEAF_DAYS, help=f"validity in days (default {LEAF_DAYS})")
        common(q)
        broker(q)
        q.set_defaults(func=issue(kind))  # type: ignore[arg-type]

    r = psub.add_parser("revoke", help="revoke a name's certificates (the CRL and the access rules are rewritten)")
    r.add_argument("name")
    common(r)
    broker(r)
    r.set_defaults(func=revoke)

    a = psub.add_parser(
        "apply",
        help="make a running broker's access rules those of the files (lets new names in, cuts revoked ones off)",
    )
    common(a)
    broker(a, required=True)
    a.set_defaults(func=apply_rules)

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
