"""Writing a verified batch into the record, and what follows from it in the same transaction.

Order inside the transaction matters for concurrent collectors: each touched chain row is locked
first (key ids in sorted order, so two collectors never wait on each other in a cycle), then each
touched battery and vehicle row, again sorted. A second collector holding consecutive events of the
same device therefore waits, and then sees this one's events: watermarks never go backwards and
replays see every event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple, TypeVar

from battery_trace.protocol.events import ZERO_HASH
from battery_trace.protocol.text import escaped
from battery_trace.server import rules
from battery_trace.server.records import Accepted, Rejected
from battery_trace.server.rules import EventFacts, Finding
from battery_trace.server.store.db import Tx
from battery_trace.server.store.queries import event_fields


@dataclass(frozen=True)
class RuleSettings:
    deadlines_days: Mapping[str, float] = field(default_factory=lambda: dict(rules.DEFAULT_DEADLINES_DAYS))
    unaccounted_days: float = 30.0
    gap_minutes: float = 60.0
    clock_tolerance_minutes: float = 15.0  # an event dated later than its arrival by more is a clock_ahead


class Watermark(NamedTuple):
    """How far a chain is stored: every event of the key up to ``seq`` is stored and links to the one
    before it, and ``hash`` is the envelope hash of the event at ``seq`` (zeros at 0). A receipt says
    both, so an agent can tell the chain the server holds from its own (docs/wire-contract.md)."""

    device: str
    seq: int
    hash: bytes


@dataclass(frozen=True)
class CommitResult:
    stored: int
    duplicates: int
    quarantined: int
    watermarks: dict[bytes, Watermark]  # every chain the batch touched
    findings: int
    refused: tuple[Rejected, ...] = ()  # events the database refused, quarantined as store_refused


def store_refused(item: Accepted, exc: BaseException) -> Rejected:
    """The quarantine entry of one event the database refused although it passed verification."""
    why = (str(exc).strip().splitlines() or [""])[0]
    detail = f"the store refused this event ({type(exc).__name__}: {why}); the rest of its batch is stored"
    return Rejected(item.topic, item.envelope.raw, "store_refused", detail)


def merged(results: Iterable[CommitResult], refused: Iterable[Rejected]) -> CommitResult:
    """One result for a batch committed in parts, in order: a later part's watermark is the newer one."""
    parts = list(results)
    watermarks: dict[bytes, Watermark] = {}
    for part in parts:
        watermarks.update(part.watermarks)
    return CommitResult(
        sum(p.stored for p in parts),
        sum(p.duplicates for p in parts),
        sum(p.quarantined for p in parts),
        watermarks,
        sum(p.findings for p in parts),
        tuple(refused),
    )


def _facts(item: Accepted, at: float) -> EventFacts:
    ev = item.event
    return EventFacts(item.kid, ev.seq, ev.device, ev.type, rules.ordering_time(ev.time_ms, at), at, dict(ev.fields))


# A batch costs a fixed number of statements, however many devices and batteries it touches: rows are
# looked up and locked in sets. Lists go in chunks well under every backend's parameter limit.
_CHUNK = 500


def _chunks(items: list, size: int = _CHUNK) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _in(tx: Tx, sql: str, column_type: str, values: list, suffix: str = "") -> list[tuple]:
    """``sql`` with ``IN ({rows})`` filled for each chunk of ``values``; rows of all chunks."""
    rows: list[tuple] = []
    for chunk in _chunks(values):
        source, params = tx.rows((column_type,), [(v,) for v in chunk])
        rows.extend(tx.all(sql.format(rows=source) + suffix, params))
    return rows


def _pairs(tx: Tx, columns: str, pairs: Iterable[tuple[bytes, int]]) -> list[tuple]:
    """Rows of ``events`` for the given (kid, seq) pairs, with ``columns`` after kid and seq."""
    rows: list[tuple] = []
    for chunk in _chunks(sorted(set(pairs))):
        source, params = tx.rows(("blob", "bigint"), chunk)
        rows.extend(
            tx.all(
                f"WITH wanted (kid, seq) AS ({source}) SELECT e.kid, e.seq, {columns} FROM events e "
                "JOIN wanted w ON e.kid = w.kid AND e.seq = w.seq",
                params,
            )
        )
    return rows


def commit(
    tx: Tx, accepted: Iterable[Accepted], rejected: Iterable[Rejected], at: float, settings: RuleSettings
) -> CommitResult:
    items = list(accepted)
    devices = {i.kid: i.event.device for i in items}
    kids = sorted(devices)
    findings: list[Finding] = []
    reused: list[Rejected] = []
    duplicates = 0
    fresh: dict[tuple[bytes, int], Accepted] = {}
    watermarks: dict[bytes, Watermark] = {}
    if kids:
        tx.executemany(
            "INSERT INTO chains (kid, device, watermark, max_seq, last_received_at) VALUES (?, ?, 0, 0, ?) "
            "ON CONFLICT (kid) DO NOTHING",
            [(kid, devices[kid], at) for kid in kids],
        )
        locked = _in(
            tx,
            "SELECT kid, watermark, max_seq FROM chains WHERE kid IN ({rows})",
            "blob",
            kids,
            f" ORDER BY kid{tx.dialect.for_update}",
        )
        chains = {r[0]: (r[1], r[2]) for r in locked}
        # Under the chains' locks a chain's max_seq is its highest stored sequence number, so only what
        # lies at or below it can be stored already: usually nothing, and then no lookup at all.
        maybe_stored = [(i.kid, i.event.seq) for i in items if i.event.seq <= chains[i.kid][1]]
        stored = {(r[0], r[1]): r[2] for r in _pairs(tx, "e.hash", maybe_stored)}
        for item in items:
            key = (item.kid, item.event.seq)
            known = stored.get(key) or (fresh[key].envelope.hash if key in fresh else None)
            if known is None:
                fresh[key] = item
            elif known == item.envelope.hash:
                duplicates += 1  # the same envelope again (at-least-once delivery): acknowledged, not stored
            else:
                # Signed by the device, but a second, different event under a used sequence number: the
                # first one stays the record; this one is kept in quarantine and the fork is a finding.
                kid, seq = key
                detail = f"seq {seq} of key {kid.hex()} is already stored with other content"
                reused.append(Rejected(item.topic, item.envelope.raw, "sequence_reused", detail))
                findings.append(Finding("chain_break", f"device:{devices[kid]}", key, f"seq {seq} signed twice"))
        _insert_events(tx, list(fresh.values()), at)
        links, around = _chain_links(tx, chains, fresh)
        findings.extend(links)
        watermarks = _advance(tx, chains, devices, fresh, around, at)
    quarantined = _quarantine(tx, [*rejected, *reused], at)
    findings.extend(_derive(tx, list(fresh.values()), at, settings))
    raised = _raise(tx, findings, at)
    return CommitResult(len(fresh), duplicates, quarantined, watermarks, raised)


_EVENT_COLUMNS = (
    ("kid", "blob"),
    ("seq", "bigint"),
    ("device", "text"),
    ("type", "text"),
    ("vin", "text"),
    ("device_time_ms", "bigint"),
    ("received_at", "real"),
    ("hash", "blob"),
    ("prev", "blob"),
    ("envelope", "blob"),
    ("facts", "text"),
)
_CODE_COLUMNS = (
    ("code", "text"),
    ("kid", "blob"),
    ("seq", "bigint"),
    ("field", "text"),
    ("type", "text"),
    ("device_time_ms", "bigint"),
    ("valid", "bool"),
)


def _insert_events(tx: Tx, items: list[Accepted], at: float) -> None:
    tx.insert_rows(  # plain inserts: the chains' row locks and the checks above rule out a conflict
        "events",
        _EVENT_COLUMNS,
        [
            (
                i.kid,
                i.event.seq,
                i.event.device,
                i.event.type,
                i.event.fields.get("vin"),
                i.event.time_ms,
                at,
                i.envelope.hash,
                i.event.prev,
                i.envelope.raw,
                None if i.event.type == "health" else rule_facts(i.event.fields),  # health is never replayed
            )
            for i in items
        ],
    )
    tx.insert_rows(  # the events are new, and (code, kid, seq, field) names one field of one event
        "event_codes",
        _CODE_COLUMNS,
        [
            (
                code,
                i.kid,
                i.event.seq,
                path,
                i.event.type,
                i.event.time_ms,
                path not in {p.path for p in i.code_problems},
            )
            for i in items
            for path, code in i.event.codes()
        ],
    )


Neighbours = dict[tuple[bytes, int], tuple[bytes, bytes]]  # (kid, seq) -> (hash, prev) of stored events


def _chain_links(
    tx: Tx, chains: Mapping[bytes, tuple[int, int]], fresh: Mapping[tuple[bytes, int], Accepted]
) -> tuple[list[Finding], Neighbours]:
    """A new event must link to the stored one before it, and the stored one after it to the new one.
    Returns the findings and the stored neighbours it read."""
    neighbours = {
        (k, n)
        for k, s in fresh
        for n in (s - 1, s + 1)
        if 1 <= n <= chains[k][1] and (k, n) not in fresh  # stored ones are at most max_seq
    }
    around = {(r[0], r[1]): (r[2], r[3]) for r in _pairs(tx, "e.hash, e.prev", neighbours)}
    out = []
    for (kid, seq), item in sorted(fresh.items()):
        subject = f"device:{item.event.device}"
        if seq > 1:
            before = fresh[(kid, seq - 1)].envelope.hash if (kid, seq - 1) in fresh else None
            before = before or around.get((kid, seq - 1), (None, None))[0]
            if before is not None and before != item.event.prev:
                out.append(Finding("chain_break", subject, (kid, seq), f"seq {seq} does not link to seq {seq - 1}"))
        elif item.event.prev != ZERO_HASH:  # the schema already refuses this; kept as the chain's own rule
            out.append(Finding("chain_break", subject, (kid, seq), "seq 1 must have an all-zero prev"))
        after = around.get((kid, seq + 1))
        if after is not None and after[1] != item.envelope.hash:
            out.append(Finding("chain_break", subject, (kid, seq + 1), f"seq {seq + 1} does not link to seq {seq}"))
    return out, around


def _advance(
    tx: Tx,
    chains: Mapping[bytes, tuple[int, int]],
    devices: Mapping[bytes, str],
    fresh: Mapping[tuple[bytes, int], Accepted],
    around: Neighbours,
    at: float,
) -> dict[bytes, Watermark]:
    """Move each touched chain's watermark over every following event that is stored and links to the
    one before it. A receipt promises exactly that, so a chain whose link is broken (a replaced or
    cloned outbox under the same key) is receipted only up to the break."""
    marks: dict[bytes, Watermark] = {}
    unknown: list[tuple[bytes, int]] = []  # watermarks that did not move, whose hash is not at hand
    beyond: dict[bytes, dict[int, tuple[bytes, bytes]]] = {}
    # Only a chain whose next event arrived in this batch can move. Of those, only a chain with stored
    # events beyond its watermark (a hole just filled) reads them; every other chain is decided by the
    # batch alone, however long its history and however long ago a hole opened.
    filling = sorted(kid for kid, (wm, top) in chains.items() if top > wm and (kid, wm + 1) in fresh)
    for chunk in _chunks(filling):
        source, params = tx.rows(("blob", "bigint"), [(kid, chains[kid][0]) for kid in chunk])
        for kid, seq, digest, prev in tx.all(
            f"WITH w (kid, wm) AS ({source}) SELECT e.kid, e.seq, e.hash, e.prev FROM events e JOIN w "
            "ON e.kid = w.kid AND e.seq > w.wm ORDER BY e.kid, e.seq",
            params,
        ):
            beyond.setdefault(kid, {})[seq] = (digest, prev)
    for kid, (wm, _) in chains.items():
        seq = wm
        if (kid, wm + 1) in fresh:
            # The first step checks the link to the event at the watermark, which _chain_links read.
            digest = ZERO_HASH if wm == 0 else around[(kid, wm)][0]
            following = beyond.get(kid, {})
            while True:
                item = fresh.get((kid, seq + 1))
                step = (item.envelope.hash, item.event.prev) if item else following.get(seq + 1)
                if step is None or step[1] != digest:
                    break
                seq, digest = seq + 1, step[0]
        elif wm == 0:
            digest = ZERO_HASH
        elif (kid, wm) in around:
            digest = around[(kid, wm)][0]
        else:
            digest = b""
            unknown.append((kid, wm))
        marks[kid] = Watermark(devices[kid], seq, digest)
    for kid, _, digest in _pairs(tx, "e.hash", unknown):
        marks[kid] = marks[kid]._replace(hash=digest)
    highest = {kid: top for kid, (_, top) in chains.items()}
    for kid, seq in fresh:
        highest[kid] = max(highest[kid], seq)
    tx.executemany(
        "UPDATE chains SET watermark = ?, max_seq = ?, last_received_at = ? WHERE kid = ?",
        [(marks[kid].seq, highest[kid], at, kid) for kid in sorted(chains)],
    )
    tx.executemany(  # a hole that is now filled is no longer a gap
        "UPDATE findings SET resolved_at = ? WHERE kind = 'sequence_gap' AND ref_kid = ? AND ref_seq <= ? "
        "AND resolved_at IS NULL",
        [(at, kid, marks[kid].seq) for kid in sorted(chains)],
    )
    return marks


# Quarantine rows keep the raw bytes whole (up to the intake's size limit); the texts beside them are
# escaped and bounded so that every backend can hold them, whatever a device or broker put in them.
_TOPIC_MAX = 512
_DETAIL_MAX = 2000


# An oversized message (too_large) keeps this much of its start, with its full size and hash: enough to
# tell what it was, never a way to fill the record. Messages within the intake's limit are kept whole.
RAW_PREFIX = 4096


def _quarantine(tx: Tx, rejected: Iterable[Rejected], at: float) -> int:
    rows = [
        (
            at,
            escaped(r.topic, _TOPIC_MAX),
            _topic_device(r.topic),
            r.reason,
            escaped(r.detail, _DETAIL_MAX),
            r.raw[:RAW_PREFIX] if r.reason == "too_large" else r.raw,
            len(r.raw),
            hashlib.sha256(r.raw).digest(),
        )
        for r in rejected
    ]
    tx.executemany(
        "INSERT INTO quarantine (received_at, topic, device, reason, detail, raw, size, sha256) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    return len(rows)


def _topic_device(topic: str) -> str | None:
    parts = topic.split("/")
    return escaped(parts[2][:64]) if len(parts) == 4 else None


# -- derived state --------------------------------------------------------------------------------


def _derive(tx: Tx, new: list[Accepted], at: float, settings: RuleSettings) -> list[Finding]:
    out: list[Finding] = []
    lifecycle: dict[str, list[EventFacts]] = {}  # per battery code, the batch's lifecycle events
    by_vin: dict[str, list[EventFacts]] = {}  # per VIN, the batch's lifecycle events naming it
    seen_codes: dict[str, EventFacts] = {}
    health_codes: dict[str, list[EventFacts]] = {}
    vins: set[str] = set()
    for item in new:
        facts = _facts(item, at)
        if item.event.time_ms > facts.time_ms:  # dated after its arrival: perhaps a clock far ahead
            ahead = rules.clock_ahead(facts, item.event.time_ms, settings.clock_tolerance_minutes)
            if ahead:
                out.append(ahead)
        for problem in item.code_problems:
            code = dict(item.event.codes())[problem.path]
            out.append(Finding("invalid_code", rules.battery(code), facts.ref, f"{problem.path}: {problem.message}"))
        codes = [code for _, code in item.event.codes()]
        subject = rules.battery(codes[0]) if codes else rules.vehicle(item.event.fields.get("vin", "?"))
        late = rules.late_report(facts, settings.deadlines_days, subject)
        if late:
            out.append(late)
        for code in codes:
            (health_codes if item.event.type == "health" else lifecycle).setdefault(code, []).append(facts)
            if code not in seen_codes or seen_codes[code].order() < facts.order():
                seen_codes[code] = facts
        vin = item.event.fields.get("vin")
        if vin is not None:
            vins.add(vin)
            if item.event.type != "health":
                by_vin.setdefault(vin, []).append(facts)
    if seen_codes:
        out.extend(_batteries(tx, seen_codes, lifecycle, health_codes, at))
    _vehicles(tx, sorted(vins), by_vin, at)
    return out


# What a lifecycle event contributes to the rules is kept beside it (events.facts, JSON): a replay
# reads that instead of decoding envelopes again (a produced event's 1,024 children made each child's
# replay decode the parent's 27 KB envelope: 16.6 s for 100 such events). Older rows, from before the
# column, are decoded once and filled in.
_FACT_COLUMNS = "e.kid, e.seq, e.device, e.type, e.device_time_ms, e.received_at, e.facts, "
_FACT_COLUMNS += "CASE WHEN e.facts IS NULL THEN e.envelope END"
# Both lookups go through an index: event_codes by code (lifecycle rows only), events by VIN.
_BATTERY_LIFECYCLE = (
    f"SELECT DISTINCT {_FACT_COLUMNS} FROM event_codes c JOIN events e ON e.kid = c.kid AND e.seq = c.seq "
    "WHERE c.code = ? AND c.type <> 'health'"
)
_VEHICLE_LIFECYCLE = f"SELECT {_FACT_COLUMNS} FROM events e WHERE e.vin = ? AND e.type <> 'health'"


def rule_facts(fields: Mapping[str, Any]) -> str:
    """The JSON of what the rules read of an event's fields (events.facts)."""
    return json.dumps({k: fields[k] for k in rules.RULE_FIELDS if k in fields}, separators=(",", ":"))


def _lifecycle_facts(tx: Tx, sql: str, value: str) -> list[EventFacts]:
    out = []
    for kid, seq, device, event_type, time_ms, received_at, facts, raw in tx.all(sql, (value,)):
        if facts is None:
            facts = rule_facts(event_fields(raw))
            tx.execute("UPDATE events SET facts = ? WHERE kid = ? AND seq = ?", (facts, kid, seq))
        fields = json.loads(facts)
        out.append(
            EventFacts(kid, seq, device, event_type, rules.ordering_time(time_ms, received_at), received_at, fields)
        )
    return out


Order = tuple[int, float, bytes, int]  # EventFacts.order() of the last lifecycle event applied to a row


def _applied(row: tuple[Any, ...]) -> Order | None:
    """The stored order key of the last lifecycle event applied (None for rows from before it was kept)."""
    return None if row[0] is None else (row[0], row[1], row[2], row[3])


State = TypeVar("State", rules.BatteryState, rules.VehicleState)


def _up_to_date(
    tx: Tx,
    at: float,
    new: list[EventFacts],
    applied: Order | None,
    *,
    stored: Callable[[], State],
    step: Callable[[State, EventFacts, list[Finding]], None],
    replay: Callable[[list[EventFacts]], tuple[State, list[Finding]]],
    lifecycle: tuple[str, str],
    findings: tuple[str, tuple[str, ...]],
) -> tuple[State, Order]:
    """A battery's or vehicle's state after this batch's lifecycle events (``new``, in order), and the
    order key of the last one applied. When they all come after the last event applied to the stored
    state, they are steps from it and their findings are raised; otherwise the whole lifecycle
    (``lifecycle``: its query and subject) is replayed and the replayed kinds of ``findings``
    (subject, kinds) are made exactly what the replay found."""
    if applied is not None and new[0].order() > applied:
        state = stored()
        found: list[Finding] = []
        for e in new:
            step(state, e, found)
        for f in found:
            _upsert(tx, f, at)
        return state, new[-1].order()
    every = _lifecycle_facts(tx, *lifecycle)
    state, found = replay(every)
    _reconcile(tx, *findings, found, at)
    return state, max(e.order() for e in every)


def _batteries(
    tx: Tx,
    latest: Mapping[str, EventFacts],
    lifecycle: Mapping[str, list[EventFacts]],
    health: Mapping[str, list[EventFacts]],
    at: float,
) -> list[Finding]:
    """Keep each named battery's row current. A battery whose new lifecycle events all come after the
    last one applied to it (the usual case) takes just those steps from its stored state; only an
    event that arrives out of order makes it replay its lifecycle. Either way the cost of a batch does
    not grow with how long the battery has lived."""
    codes = sorted(latest)
    tx.executemany(
        "INSERT INTO batteries (code, state, last_event_ms, last_received_at) VALUES (?, 'unknown', ?, ?) "
        "ON CONFLICT (code) DO NOTHING",
        [(code, latest[code].time_ms, at) for code in codes],
    )
    rows = _in(
        tx,
        "SELECT code, state, vin, place, out_of_service_ms, final_ms, last_event_ms, "
        "applied_ms, applied_received, applied_kid, applied_seq FROM batteries WHERE code IN ({rows})",
        "text",
        codes,
        f" ORDER BY code{tx.dialect.for_update}",
    )
    out: list[Finding] = []
    touched = []
    for code, state, vin, place, oos, final_ms, last_event_ms, *applied_row in rows:
        newest = max(last_event_ms, latest[code].time_ms)
        new = sorted(lifecycle.get(code, ()), key=EventFacts.order)
        if new:
            s, last = _up_to_date(
                tx,
                at,
                new,
                _applied(tuple(applied_row)),
                stored=partial(rules.BatteryState, code, state, vin, place, oos, final_ms, last_event_ms),
                step=rules.apply_battery,
                replay=partial(rules.replay_battery, code),
                lifecycle=(_BATTERY_LIFECYCLE, code),
                findings=(rules.battery(code), rules.REPLAYED_BATTERY_KINDS),
            )
            tx.execute(
                "UPDATE batteries SET state = ?, vin = ?, place = ?, out_of_service_ms = ?, final_ms = ?, "
                "last_event_ms = ?, last_received_at = ?, applied_ms = ?, applied_received = ?, applied_kid = ?, "
                "applied_seq = ? WHERE code = ?",
                (
                    s.state,
                    s.vin,
                    s.place,
                    s.out_of_service_ms,
                    s.final_ms,
                    max(newest, s.last_event_ms),
                    at,
                    *last,
                    code,
                ),
            )
            if s.state == "recycled" and s.final_ms is not None:
                # The recycling itself may have arrived now, after events it precedes: all of them,
                # except those already flagged (re-raising thousands each batch inflated the counts).
                later = tx.all(
                    "SELECT c.kid, c.seq, c.type FROM event_codes c WHERE c.code = ? AND c.device_time_ms > ? "
                    "AND NOT EXISTS (SELECT 1 FROM findings f WHERE f.kind = 'after_end_of_life' "
                    "AND f.subject = ? AND f.ref_kid = c.kid AND f.ref_seq = c.seq)",
                    (code, s.final_ms, rules.battery(code)),
                )
                out.extend(rules.after_end_of_life(code, s.final_ms, later))
            continue
        touched.append((newest, at, code))
        if state == "recycled" and final_ms is not None:  # only this batch's events can be new findings
            later = [(e.kid, e.seq, e.type) for e in health.get(code, ()) if e.time_ms > final_ms]
            out.extend(rules.after_end_of_life(code, final_ms, later))
    tx.executemany("UPDATE batteries SET last_event_ms = ?, last_received_at = ? WHERE code = ?", touched)
    # Any new event accounts for a battery again; the sweep raises "unaccounted" when time passes.
    stale = _in(
        tx,
        "SELECT id FROM findings WHERE kind = 'unaccounted' AND resolved_at IS NULL AND subject IN ({rows})",
        "text",
        [rules.battery(code) for code in codes],
    )
    tx.executemany("UPDATE findings SET resolved_at = ? WHERE id = ?", [(at, r[0]) for r in stale])
    return out


def _vehicles(tx: Tx, vins: list[str], lifecycle: Mapping[str, list[EventFacts]], at: float) -> None:
    """Keep each named vehicle's row current, the way _batteries does (a health snapshot that names a
    VIN changes nothing about the vehicle, so it only makes the vehicle known)."""
    tx.executemany(
        "INSERT INTO vehicles (vin, state, batteries, last_event_ms) VALUES (?, 'unknown', '[]', 0) "
        "ON CONFLICT (vin) DO NOTHING",
        [(vin,) for vin in vins if vin not in lifecycle],
    )
    for vin in sorted(lifecycle):
        tx.execute(
            "INSERT INTO vehicles (vin, state, batteries, last_event_ms) VALUES (?, 'unknown', '[]', 0) "
            "ON CONFLICT (vin) DO NOTHING",
            (vin,),
        )
        state, batteries, last_event_ms, *applied_row = tx.one(
            "SELECT state, batteries, last_event_ms, applied_ms, applied_received, applied_kid, applied_seq "
            f"FROM vehicles WHERE vin = ?{tx.dialect.for_update}",
            (vin,),
        ) or ("unknown", "[]", 0, None, None, None, None)
        v, last = _up_to_date(
            tx,
            at,
            sorted(lifecycle[vin], key=EventFacts.order),
            _applied(tuple(applied_row)),
            stored=partial(rules.VehicleState, vin, state, set(json.loads(batteries)), last_event_ms),
            step=rules.apply_vehicle,
            replay=partial(rules.replay_vehicle, vin),
            lifecycle=(_VEHICLE_LIFECYCLE, vin),
            findings=(rules.vehicle(vin), rules.REPLAYED_VEHICLE_KINDS),
        )
        tx.execute(
            "UPDATE vehicles SET state = ?, batteries = ?, last_event_ms = ?, applied_ms = ?, applied_received = ?, "
            "applied_kid = ?, applied_seq = ? WHERE vin = ?",
            (v.state, json.dumps(sorted(v.batteries)), v.last_event_ms, *last, vin),
        )


def _upsert(tx: Tx, f: Finding, at: float) -> None:
    tx.execute(
        "INSERT INTO findings (kind, subject, ref_kid, ref_seq, detail, raised_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (kind, subject, ref_kid, ref_seq) DO UPDATE SET detail = excluded.detail, resolved_at = NULL",
        (f.kind, escaped(f.subject), f.ref[0], f.ref[1], escaped(f.detail, _DETAIL_MAX), at),
    )


def _raise(tx: Tx, findings: list[Finding], at: float) -> int:
    for f in findings:
        _upsert(tx, f, at)
    return len(findings)


def _reconcile(tx: Tx, subject: str, kinds: Iterable[str], desired: list[Finding], at: float) -> None:
    """Make the open findings of these kinds for this subject exactly ``desired``: raise new, resolve gone."""
    kinds = tuple(kinds)
    marks = ",".join("?" * len(kinds))
    open_rows = tx.all(
        f"SELECT id, kind, ref_kid, ref_seq FROM findings WHERE subject = ? AND kind IN ({marks}) "
        "AND resolved_at IS NULL",
        (subject, *kinds),
    )
    wanted = {(f.kind, f.ref) for f in desired}
    for row_id, kind, ref_kid, ref_seq in open_rows:
        if (kind, (ref_kid, ref_seq)) not in wanted:
            tx.execute("UPDATE findings SET resolved_at = ? WHERE id = ?", (at, row_id))
    for f in desired:
        _upsert(tx, f, at)


def sweep(tx: Tx, now: float, settings: RuleSettings) -> int:
    """Time-based findings: batteries unaccounted for too long, sequence holes older than the gap window."""
    raised = 0
    now_ms = int(now * 1000)
    limit_ms = now_ms - int(settings.unaccounted_days * rules.DAY_MS)
    idle = tx.all(
        "SELECT code, state, vin, place, out_of_service_ms, final_ms, last_event_ms FROM batteries "
        "WHERE state IN ('removed', 'retired') AND out_of_service_ms IS NOT NULL AND last_event_ms < ?",
        (limit_ms,),
    )
    for code, state, vin, place, oos, final_ms, last_ms in idle:
        s = rules.BatteryState(code, state, vin, place, oos, final_ms, last_ms)
        ref = tx.one(
            "SELECT kid, seq FROM event_codes WHERE code = ? ORDER BY device_time_ms DESC, seq DESC LIMIT 1", (code,)
        )
        finding = rules.unaccounted(s, (ref[0], ref[1]) if ref else (b"", 0), now_ms, settings.unaccounted_days)
        _reconcile(tx, rules.battery(code), ("unaccounted",), [finding] if finding else [], now)
        raised += finding is not None
    gap_before = now - settings.gap_minutes * 60
    chains = tx.all("SELECT kid, device, watermark FROM chains WHERE max_seq > watermark")
    for kid, device, watermark in chains:
        first_after = tx.value("SELECT MIN(received_at) FROM events WHERE kid = ? AND seq > ?", (kid, watermark))
        # A watermark also stops at a broken link, whose next event is stored: a chain_break, not a gap.
        present = tx.value("SELECT 1 FROM events WHERE kid = ? AND seq = ?", (kid, watermark + 1)) is not None
        subject = f"device:{device}"
        desired = []
        if first_after is not None and first_after < gap_before and not present:
            desired.append(
                Finding(
                    "sequence_gap", subject, (kid, watermark + 1), f"seq {watermark + 1} of key {kid.hex()} missing"
                )
            )
        _reconcile_gaps(tx, subject, kid, desired, now)
        raised += len(desired)
    return raised


def _reconcile_gaps(tx: Tx, subject: str, kid: bytes, desired: list[Finding], now: float) -> None:
    for row_id, ref_seq in tx.all(
        "SELECT id, ref_seq FROM findings WHERE kind = 'sequence_gap' AND subject = ? AND ref_kid = ? "
        "AND resolved_at IS NULL",
        (subject, kid),
    ):
        if all(f.ref != (kid, ref_seq) for f in desired):
            tx.execute("UPDATE findings SET resolved_at = ? WHERE id = ?", (now, row_id))
    for f in desired:
        _upsert(tx, f, now)


def flag_after_revocation(tx: Tx, kids: list[bytes], at: float, now: float) -> int:
    """Events already stored that arrived after a (backdated) revocation time become findings."""
    flagged = 0
    for kid in kids:
        for device, seq in tx.all("SELECT device, seq FROM events WHERE kid = ? AND received_at >= ?", (kid, at)):
            detail = f"stored before key {kid.hex()} was revoked with effect from an earlier time"
            _upsert(tx, Finding("revoked_key", f"device:{device}", (kid, seq), detail), now)
            flagged += 1
    return flagged
