"""Questions to the record: ``trace``, ``vehicle``, ``device``, ``findings``, ``rejects``, ``export``, ``audit``."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from battery_trace.server import inputs, rules
from battery_trace.server.audit import audit_chain
from battery_trace.server.cli.common import (
    INVALID,
    OK,
    UsageError,
    add_config,
    add_json,
    iso,
    iso_ms,
    open_store,
    print_json,
    time_arg,
    whole_arg,
)
from battery_trace.server.store import queries


def _event_line(e: dict[str, Any], code: str | None = None) -> str:
    """One line of a timeline: when, what, where."""
    f = e["fields"]
    what = e["type"]
    if what == "installed":
        detail = f"into {f['vin']}"
    elif what in ("swapped", "replaced"):
        if code is None:
            detail = f"{f.get('code_out', 'unidentified')} out, {f.get('code_in', 'unidentified')} in"
        else:
            detail = f"out of {f['vin']}" if f.get("code_out") == code else f"into {f['vin']}"
    elif what == "vehicle_scrapped":
        detail = f"{f['vin']} scrapped, recovered {', '.join(f['codes']) or 'no battery'}"
    elif what == "handed_over":
        detail = f"{f['from_entity']} -> {f['to_entity']} ({f['to_role']})"
    elif what == "repurposed":
        detail = f"{f['code']} -> {f['new_code']} for {f['application']}"
    elif what == "recycled":
        detail = f"{f['mass_kg']} kg, recovered {json.dumps(f['materials'])}"
    elif what == "health":
        h = f["health"]
        detail = ", ".join(f"{k} {v}" for k, v in h.items() if not isinstance(v, list))
    elif what == "maintenance":
        detail = f["action"] + (f": {f['findings']}" if f.get("findings") else "")
    elif what == "sold":
        detail = f"{f['vin']} to a {f['buyer_kind']} buyer"
    else:
        detail = ", ".join(f"{k} {v}" for k, v in f.items() if not isinstance(v, list | dict))
    return f"  {iso_ms(e['time_ms'])}  {what:<16} {detail}  [{e['device']} #{e['seq']}]"


def _print_findings(found: list[dict[str, Any]]) -> None:
    for f in found:
        status = "open" if f["resolved_at"] is None else f"resolved {iso(f['resolved_at'])}"
        print(f"  {f['kind']:<22} {f['subject']:<34} {f['detail']}  ({status})")


def _more(following: str | None, flag: str, what: str) -> None:
    """Where the next page starts, on stderr (stdout stays the page, in JSON or text)."""
    if following is not None:
        print(f"more {what}: add {flag} {following}", file=sys.stderr)


def trace(args: argparse.Namespace) -> int:
    from battery_trace.protocol.battery_code import normalise

    code = normalise(args.code)
    store = open_store(args)
    try:
        result = store.trace(code, args.limit, args.after, lifecycle=not args.json)
    finally:
        store.close()
    if result is None:
        print(f"no event in the record names battery {code}", file=sys.stderr)
        return INVALID
    _more(result["next"], "--after", "events")
    if args.json:
        print_json(result)
        return OK
    where = f" in {result['vin']}" if result["vin"] else (f" at {result['place']}" if result["place"] else "")
    print(f"battery {code}: {result['state'].replace('_', ' ')}{where}; last event {iso_ms(result['last_event_ms'])}")
    print(f"life ({len(result['events'])} lifecycle events{' shown' if result['next'] else ''}):")
    for e in result["events"]:
        print(_event_line(e, code))
    health = result["health"]
    if health:
        first, last = health[0], health[-1]
        trend = ", ".join(
            f"{k} {first[k]} -> {last[k]}"
            for k in ("soc_pct", "soh_pct", "voltage_v", "cycles")
            if k in first and k in last
        )
        span = f"{iso_ms(first['time_ms'])} .. {iso_ms(last['time_ms'])}"
        print(f"health: {result['health_count']} readings (snapshots, swaps, maintenance), {span}: {trend}")
    for name, codes in result["links"].items():
        if codes:
            print(f"{name.replace('_', ' ')}: {', '.join(codes)}")
    if result["findings"]:
        print("findings:")
        _print_findings(result["findings"])
    return OK


def vehicle(args: argparse.Namespace) -> int:
    vin = args.vin.strip().upper()
    store = open_store(args)
    try:
        result = store.vehicle(vin, args.limit, args.after)
    finally:
        store.close()
    if result is None:
        print(f"no event in the record names vehicle {vin}", file=sys.stderr)
        return INVALID
    _more(result["next"], "--after", "events")
    if args.json:
        print_json(result)
        return OK
    print(f"vehicle {vin}: {result['state']}; batteries now: {', '.join(result['batteries']) or 'none'}")
    for e in result["events"]:
        if e["type"] != "health":
            print(_event_line(e))
    if result["findings"]:
        print("findings:")
        _print_findings(result["findings"])
    return OK


def device(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        result = store.device(args.device)
    finally:
        store.close()
    if result is None:
        print(f"{args.device} is not enrolled", file=sys.stderr)
        return INVALID
    if args.json:
        print_json(result)
        return OK
    print(f"device {result['device']} ({result['role']}, {result['org'] or 'no organisation'})")
    print(f"  chain {result['chain']}; last seen {iso(result['last_seen'])} UTC; {result['quarantined']} quarantined")
    for k in result["keys"]:
        missing = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in k["missing"]) or "none"
        print(
            f"  key {k['kid']} {k['state']:<8} stored {k['stored']}, watermark {k['watermark']}, "
            f"highest {k['max_seq']}, missing {missing}"
        )
    if result["chain_breaks"]:
        print("chain breaks:")
        _print_findings(result["chain_breaks"])
    return OK


def findings(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        store.sweep(time.time())  # bring time-based findings up to now
        found, following = store.findings_page(args.open, args.kind, args.limit, args.before)
    finally:
        store.close()
    _more(following, "--before", "findings (older)")
    if args.json:
        print_json(found)
        return OK
    if not found:
        print("no findings" + (" open" if args.open else ""))
    _print_findings(found)
    return OK


def rejects(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        rows = store.rejects(args.reason, args.since, args.limit + 1, args.before)
    finally:
        store.close()
    rows, following = queries.cut(rows, args.limit, lambda r: str(r["id"]))
    _more(following, "--before", "rejected messages (older)")
    if not args.raw:
        for r in rows:
            r.pop("raw")
    if args.json:
        print_json(rows)
        return OK
    if not rows:
        print("no rejected messages")
    for r in rows:
        print(f"  {iso(r['received_at'])}  {r['reason']:<20} {r['topic']:<40} {r['size']:>6} B  {r['detail']}")
    return OK


EXPORT_COLUMNS = ("device", "kid", "seq", "type", "vin", "time", "received", "fields", "hash", "envelope")


def _export_row(row: tuple) -> dict[str, Any]:
    device, kid, seq, etype, vin, time_ms, received, fields, digest, envelope = row
    return {
        "device": device,
        "kid": kid.hex(),
        "seq": seq,
        "type": etype,
        "vin": vin,
        "time": iso_ms(time_ms).replace(" ", "T") + "Z",
        "received": iso(received).replace(" ", "T") + "Z",
        "fields": fields,
        "hash": digest.hex(),
        "envelope": base64.b64encode(envelope).decode(),
    }


def _write_export(out: TextIO, rows: Iterable[tuple], fmt: str) -> int:
    count = 0
    writer = csv.writer(out) if fmt == "csv" else None
    if writer:
        writer.writerow(EXPORT_COLUMNS)
    for raw in rows:
        row = _export_row(raw)
        if writer:
            writer.writerow([json.dumps(row["fields"]) if c == "fields" else row[c] for c in EXPORT_COLUMNS])
        else:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


def export(args: argparse.Namespace) -> int:
    if args.until <= args.since:
        raise UsageError("--until must be later than --since")
    store = open_store(args)
    try:
        rows = store.export(args.since, args.until, by_time=args.by == "time")
        if args.out:
            with open(args.out, "w", newline="") as out:
                count = _write_export(out, rows, args.format)
        else:
            count = _write_export(sys.stdout, rows, args.format)
    finally:
        store.close()
    print(f"exported {count} events", file=sys.stderr)
    return OK


def audit(args: argparse.Namespace) -> int:
    store = open_store(args)
    try:
        keys = store.device_keys(args.device)
        results = [audit_chain(k, store.chain(k.kid)) for k in keys]
    finally:
        store.close()
    if not keys:
        print(f"{args.device} is not enrolled", file=sys.stderr)
        return INVALID
    intact = all(r.first_break is None for r in results)
    if args.json:
        print_json({"device": args.device, "intact": intact, "keys": [r.to_json() for r in results]})
    else:
        for r in results:
            verdict = (
                "intact"
                if r.first_break is None
                else f"BROKEN at seq {r.first_break['seq']}: {r.first_break['problem']}"
            )
            print(f"key {r.kid} ({r.state}): {r.checked} envelopes re-verified, head {r.head}: {verdict}")
    return OK if intact else INVALID


def _paged(p: argparse.ArgumentParser, flag: str, parse: Any, help_text: str, default: int = queries.PAGE) -> None:
    """``--limit`` and the cursor flag of a list that comes a page at a time (newest or oldest first)."""
    high = queries.MAX_PAGE
    p.add_argument(
        "--limit", type=whole_arg(1, high), default=default, help=f"at most this many, 1..{high} (default: %(default)s)"
    )
    p.add_argument(flag, type=_cursor_arg(parse), help=help_text)


def _cursor_arg(parse: Any) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except inputs.InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


TIME_HELP = "ISO 8601 with a zone (2026-11-01T08:00:00Z), a date (UTC) or Unix seconds, 2000-01-01..2100-01-01"


def register(sub: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    t = sub.add_parser(
        "trace",
        help="a battery's whole life",
        description="Everything the record holds about a battery, in the order it happened: where it was, which "
        "vehicle, its health trend, its links to parts and second-life codes, and its findings. Exit 1 if the "
        "record never heard of it.",
        epilog="example:\n  battery-server trace 0RJPEA00HAU0AAG1C3000123 --json",
        formatter_class=raw,
    )
    t.add_argument("code")
    _paged(t, "--after", queries.event_cursor, "events from after this cursor (the 'more' line gives it)")
    v = sub.add_parser(
        "vehicle",
        help="a vehicle's batteries and events",
        epilog="example:\n  battery-server vehicle LNBSCB3F1PW123456",
        formatter_class=raw,
    )
    v.add_argument("vin")
    _paged(v, "--after", queries.event_cursor, "events from after this cursor (the 'more' line gives it)")
    d = sub.add_parser(
        "device",
        help="a device's chains: watermark, gaps, breaks, last seen",
        epilog="example:\n  battery-server device station-1 --json",
        formatter_class=raw,
    )
    d.add_argument("device")
    f = sub.add_parser(
        "findings",
        help="violations and anomalies the rules raised",
        description="List findings (brought up to date first: unaccounted batteries, sequence gaps).",
        epilog="example:\n  battery-server findings --open --kind incomplete_scrapping",
        formatter_class=raw,
    )
    f.add_argument("--open", action="store_true", help="only findings not resolved")
    f.add_argument("--kind", choices=rules.FINDING_KINDS)
    _paged(f, "--before", queries.id_cursor, "findings older than this cursor (the 'more' line gives it)")
    r = sub.add_parser(
        "rejects",
        help="messages refused at intake, newest first",
        epilog="example:\n  battery-server rejects --reason bad_signature --since 2026-11-01",
        formatter_class=raw,
    )
    from battery_trace.server.verify import REASONS

    r.add_argument("--reason", choices=REASONS)
    r.add_argument("--since", type=time_arg(), help=TIME_HELP)
    _paged(r, "--before", queries.id_cursor, "messages older than this cursor (the 'more' line gives it)", 100)
    r.add_argument("--raw", action="store_true", help="include the raw bytes (hex)")
    e = sub.add_parser(
        "export",
        help="events in a time window, for reporting upstream",
        description="Events (with their envelopes, base64, so the receiver can verify them) whose arrival "
        "(--by received, default) or event time (--by time) lies in [--since, --until).",
        epilog="example:\n  battery-server export --since 2026-11-01 --until 2026-11-02 --format csv --out day.csv",
        formatter_class=raw,
    )
    e.add_argument("--since", type=time_arg(), required=True, help=TIME_HELP)
    e.add_argument("--until", type=time_arg(), required=True, help=TIME_HELP)
    e.add_argument("--by", choices=("received", "time"), default="received")
    e.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    e.add_argument("--out", help="file to write (default: stdout)")
    a = sub.add_parser(
        "audit",
        help="re-verify a device's stored chains from the raw envelopes",
        description="Check every stored envelope of DEVICE against its registered key, strictly, and its hash "
        "link to the one before. Reports the first break per key. Exit 0 intact, 1 broken or missing.",
        epilog="example:\n  battery-server audit station-1",
        formatter_class=raw,
    )
    a.add_argument("device")
    for p, func in ((t, trace), (v, vehicle), (d, device), (f, findings), (r, rejects), (e, export), (a, audit)):
        add_config(p)
        if p is not e:
            add_json(p)
        p.set_defaults(func=func)
