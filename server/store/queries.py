"""Reading the record: what operators, exports and auditors ask of it. No writes here."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from battery_trace.protocol import cbor, envelope
from battery_trace.protocol.events import COMMON_FIELDS
from battery_trace.server.store.db import Tx


def event_fields(raw: bytes) -> dict[str, Any]:
    """The type-specific fields of a stored event, read from its envelope (validated at intake)."""
    payload = cbor.decode(envelope.decode(raw, max_size=len(raw)).payload)
    return {k: v for k, v in payload.items() if k not in COMMON_FIELDS}


def counts(tx: Tx) -> dict[str, Any]:
    return {
        "events": tx.value("SELECT COUNT(*) FROM events"),
        "rejected": dict(tx.all("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason ORDER BY reason")),
        "findings_open": dict(
            tx.all("SELECT kind, COUNT(*) FROM findings WHERE resolved_at IS NULL GROUP BY kind ORDER BY kind")
        ),
        "quarantine_dropped": {
            reason: {"messages": n, "bytes": size}
            for reason, n, size in tx.all("SELECT reason, messages, bytes FROM quarantine_dropped ORDER BY reason")
        },
    }


def chain(tx: Tx, kid: bytes) -> list[tuple[int, bytes]]:
    return [(r[0], r[1]) for r in tx.all("SELECT seq, envelope FROM events WHERE kid = ? ORDER BY seq", (kid,))]


def findings(tx: Tx, open_only: bool, kind: str | None, subject: str | None) -> list[dict[str, Any]]:
    sql = "SELECT id, kind, subject, ref_kid, ref_seq, detail, raised_at, resolved_at FROM findings WHERE 1 = 1"
    params: list[Any] = []
    if open_only:
        sql += " AND resolved_at IS NULL"
    if kind:
        sql += " AND kind = ?"
        params.append(kind)
    if subject:
        sql += " AND subject = ?"
        params.append(subject)
    rows = tx.all(sql + " ORDER BY raised_at, id", params)
    return [
        {
            "id": r[0],
            "kind": r[1],
            "subject": r[2],
            "event": {"kid": r[3].hex(), "seq": r[4]} if r[3] else None,
            "detail": r[5],
            "raised_at": r[6],
            "resolved_at": r[7],
        }
        for r in rows
    ]


def event_rows(
    tx: Tx, where: str, params: list[Any], order: str = "e.device_time_ms, e.received_at, e.kid, e.seq"
) -> list[dict]:
    rows = tx.all(
        "SELECT e.kid, e.seq, e.device, e.type, e.vin, e.device_time_ms, e.received_at, e.envelope, e.hash "
        f"FROM events e WHERE {where} ORDER BY {order}",
        params,
    )
    return [
        {
            "device": r[2],
            "kid": r[0].hex(),
            "seq": r[1],
            "type": r[3],
            "vin": r[4],
            "time_ms": r[5],
            "received_at": r[6],
            "fields": event_fields(r[7]),
            "hash": r[8].hex(),
        }
        for r in rows
    ]


def _battery_row(tx: Tx, code: str) -> dict[str, Any] | None:
    row = tx.one(
        "SELECT state, vin, place, out_of_service_ms, final_ms, last_event_ms, last_received_at FROM batteries "
        "WHERE code = ?",
        (code,),
    )
    if row is None:
        return None
    keys = ("state", "vin", "place", "out_of_service_ms", "final_ms", "last_event_ms", "last_received_at")
    return dict(zip(keys, row, strict=True))


def trace(tx: Tx, code: str) -> dict[str, Any] | None:
    """A battery's whole life: its state, every event naming it in time order, health trend, findings, links."""
    battery = _battery_row(tx, code)
    if battery is None:
        return None
    events = event_rows(
        tx,
        "EXISTS (SELECT 1 FROM event_codes c WHERE c.kid = e.kid AND c.seq = e.seq AND c.code = ?)",
        [code],
    )
    roles = {
        (kid.hex(), seq): field
        for kid, seq, field in tx.all("SELECT kid, seq, field FROM event_codes WHERE code = ?", (code,))
    }
    for e in events:
        e["as"] = roles.get((e["kid"], e["seq"]))
    health = [{"time_ms": e["time_ms"], **_health_of(e, code)} for e in events if _health_of(e, code)]
    links: dict[str, list[str]] = {"parts": [], "part_of": [], "second_life": [], "first_life": []}
    for e in events:
        f = e["fields"]
        if e["type"] == "produced" and f.get("code") == code:
            links["parts"].extend(f.get("children", []))
        elif e["type"] == "produced":
            links["part_of"].append(f["code"])
        elif e["type"] == "repurposed":
            (links["second_life"] if f.get("code") == code else links["first_life"]).append(
                f["new_code"] if f.get("code") == code else f["code"]
            )
    return {
        "code": code,
        **battery,
        "events": events,
        "health": health,
        "links": links,
        "findings": findings(tx, False, None, f"battery:{code}"),
    }


def _health_of(e: dict[str, Any], code: str) -> dict[str, Any]:
    f = e["fields"]
    if e["type"] == "health" or e["type"] == "maintenance":
        return dict(f.get("health") or {})
    if e["type"] == "swapped":
        return dict(f.get("health_out" if f.get("code_out") == code else "health_in") or {})
    return {}


def vehicle(tx: Tx, vin: str) -> dict[str, Any] | None:
    row = tx.one("SELECT state, batteries, last_event_ms FROM vehicles WHERE vin = ?", (vin,))
    if row is None:
        return None
    return {
        "vin": vin,
        "state": row[0],
        "batteries": json.loads(row[1]),
        "last_event_ms": row[2],
        "events": event_rows(tx, "e.vin = ?", [vin]),
        "findings": findings(tx, False, None, f"vehicle:{vin}"),
    }


def _missing_ranges(tx: Tx, kid: bytes, max_seq: int) -> list[list[int]]:
    """Holes in a key's stored sequence numbers, as [first, last] ranges."""
    starts = [
        r[0]
        for r in tx.all(
            "SELECT e.seq + 1 FROM events e WHERE e.kid = ? AND e.seq < ? AND NOT EXISTS "
            "(SELECT 1 FROM events n WHERE n.kid = e.kid AND n.seq = e.seq + 1) ORDER BY e.seq",
            (kid, max_seq),
        )
    ]
    if tx.value("SELECT MIN(seq) FROM events WHERE kid = ?", (kid,)) not in (None, 1):
        starts.insert(0, 1)
    ranges = []
    for start in starts:
        end = tx.value("SELECT MIN(seq) - 1 FROM events WHERE kid = ? AND seq > ?", (kid, start))
        ranges.append([start, end])
    return ranges


def device(tx: Tx, device_id: str) -> dict[str, Any] | None:
    row = tx.one("SELECT role, org, enrolled_at FROM devices WHERE device = ?", (device_id,))
    if row is None:
        return None
    keys = []
    for kid, state, valid_from, valid_until, revoked_at in tx.all(
        "SELECT kid, state, valid_from, valid_until, revoked_at FROM keys WHERE device = ? ORDER BY valid_from",
        (device_id,),
    ):
        chain_row = tx.one("SELECT watermark, max_seq, last_received_at FROM chains WHERE kid = ?", (kid,))
        watermark, max_seq, last_seen = chain_row or (0, 0, None)
        keys.append(
            {
                "kid": kid.hex(),
                "state": state,
                "valid_from": valid_from,
                "valid_until": valid_until,
                "revoked_at": revoked_at,
                "watermark": watermark,
                "max_seq": max_seq,
                "stored": tx.value("SELECT COUNT(*) FROM events WHERE kid = ?", (kid,)),
                "missing": _missing_ranges(tx, kid, max_seq) if max_seq > watermark else [],
                "last_seen": last_seen,
            }
        )
    breaks = [f for f in findings(tx, False, "chain_break", f"device:{device_id}")]
    return {
        "device": device_id,
        "role": row[0],
        "org": row[1],
        "enrolled_at": row[2],
        "keys": keys,
        "chain": "broken" if breaks else ("gaps" if any(k["missing"] for k in keys) else "intact"),
        "chain_breaks": breaks,
        "last_seen": max((k["last_seen"] for k in keys if k["last_seen"]), default=None),
        "quarantined": tx.value("SELECT COUNT(*) FROM quarantine WHERE device = ?", (device_id,)),
    }


def rejects(tx: Tx, reason: str | None, since: float | None, limit: int) -> list[dict[str, Any]]:
    sql = "SELECT id, received_at, topic, device, reason, detail, raw, size, sha256 FROM quarantine WHERE 1 = 1"
    params: list[Any] = []
    if reason:
        sql += " AND reason = ?"
        params.append(reason)
    if since is not None:
        sql += " AND received_at >= ?"
        params.append(since)
    rows = tx.all(sql + " ORDER BY received_at DESC, id DESC LIMIT ?", [*params, limit])
    return [
        {
            "id": r[0],
            "received_at": r[1],
            "topic": r[2],
            "device": r[3],
            "reason": r[4],
            "detail": r[5],
            "size": len(r[6]) if r[7] is None else r[7],  # rows from before migration 4 are whole
            "sha256": (r[8] or hashlib.sha256(r[6]).digest()).hex(),
            "raw": r[6].hex(),  # all of it, or the first RAW_PREFIX bytes of an oversized message
        }
        for r in rows
    ]


def export_rows(tx: Tx, since: float, until: float, by_time: bool) -> Any:
    """Events in a window (of arrival, or of event time), oldest first, with their envelopes."""
    column, scale = ("e.device_time_ms", 1000) if by_time else ("e.received_at", 1)
    cursor = tx.execute(
        "SELECT e.device, e.kid, e.seq, e.type, e.vin, e.device_time_ms, e.received_at, e.hash, e.envelope "
        f"FROM events e WHERE {column} >= ? AND {column} < ? ORDER BY {column}, e.kid, e.seq",
        (since * scale, until * scale),
    )
    for r in cursor:
        row = tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
        yield (*row[:7], event_fields(row[8]), *row[7:])


def overview(tx: Tx, now: float, window_s: float, bucket_s: float) -> dict[str, Any]:
    """The dashboard's figures: totals, ingest per time bucket, rejects by reason, findings by kind."""
    since = now - window_s
    bucket = tx.dialect.floor("received_at / ?")
    accepted = tx.all(f"SELECT {bucket}, COUNT(*) FROM events WHERE received_at >= ? GROUP BY 1", (bucket_s, since))
    refused = tx.all(f"SELECT {bucket}, COUNT(*) FROM quarantine WHERE received_at >= ? GROUP BY 1", (bucket_s, since))
    first = int(since // bucket_s) + 1
    buckets = range(first, int(now // bucket_s) + 1)
    acc, rej = dict(accepted), dict(refused)
    return {
        "time": now,
        "totals": counts(tx),
        "devices": tx.value("SELECT COUNT(*) FROM devices"),
        "devices_online": tx.value("SELECT COUNT(*) FROM device_status WHERE state = 'online'"),
        "batteries": tx.value("SELECT COUNT(*) FROM batteries"),
        "vehicles": tx.value("SELECT COUNT(*) FROM vehicles"),
        "ingest": {
            "bucket_s": bucket_s,
            "buckets": [{"start": b * bucket_s, "accepted": acc.get(b, 0), "rejected": rej.get(b, 0)} for b in buckets],
        },
    }


def devices_overview(tx: Tx) -> list[dict[str, Any]]:
    """Every device with its role, chain, what it last said about itself, and when it was last heard."""
    rows = tx.all(
        "SELECT d.device, d.role, d.org, s.state, s.backlog, s.oldest_unreceipted_s, s.alarm, s.received_at, "
        "(SELECT MAX(c.last_received_at) FROM chains c WHERE c.device = d.device), "
        "(SELECT CAST(COALESCE(SUM(c.watermark), 0) AS BIGINT) FROM chains c WHERE c.device = d.device), "
        "(SELECT COUNT(*) FROM chains c WHERE c.device = d.device AND c.max_seq > c.watermark), "
        "(SELECT COUNT(*) FROM findings f WHERE f.subject = 'device:' || d.device AND f.kind = 'chain_break' "
        "AND f.resolved_at IS NULL), "
        "(SELECT COUNT(*) FROM quarantine q WHERE q.device = d.device) "
        "FROM devices d LEFT JOIN device_status s ON s.device = d.device ORDER BY d.device"
    )
    return [
        {
            "device": r[0],
            "role": r[1],
            "org": r[2],
            "state": r[3] or "unknown",
            "backlog": r[4],
            "lag_s": r[5],
            "alarm": r[6],
            "status_at": r[7],
            "last_event_at": r[8],
            "stored": r[9],
            "chain": "broken" if r[11] else ("gaps" if r[10] else "intact"),
            "quarantined": r[12],
        }
        for r in rows
    ]
