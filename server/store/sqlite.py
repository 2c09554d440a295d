"""The embedded record: SQLite in WAL mode, append-only events, the registry and the quarantine.

Writes are idempotent by (key id, sequence): a message delivered twice is stored once. The bytes
stored are the envelope exactly as received, so anyone can re-verify the record later. Each device
key's chain keeps a watermark: the highest sequence number up to which every event is stored, which
is what receipts promise to the agent.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from protocol.keys import PublicKey
from server.records import Accepted, KeyRecord, Rejected

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        device TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        org TEXT,
        enrolled_at REAL NOT NULL
    );
    CREATE TABLE keys (
        kid BLOB PRIMARY KEY,
        device TEXT NOT NULL REFERENCES devices (device),
        public_key BLOB NOT NULL UNIQUE,
        state TEXT NOT NULL DEFAULT 'active',
        valid_from REAL NOT NULL,
        valid_until REAL,
        revoked_at REAL
    );
    CREATE TABLE events (
        kid BLOB NOT NULL,
        seq INTEGER NOT NULL,
        device TEXT NOT NULL,
        type TEXT NOT NULL,
        vin TEXT,
        device_time_ms INTEGER NOT NULL,
        received_at REAL NOT NULL,
        hash BLOB NOT NULL,
        prev BLOB NOT NULL,
        envelope BLOB NOT NULL,
        PRIMARY KEY (kid, seq)
    );
    CREATE INDEX events_device_time ON events (device, device_time_ms);
    CREATE INDEX events_vin ON events (vin) WHERE vin IS NOT NULL;
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE event_codes (
        code TEXT NOT NULL,
        kid BLOB NOT NULL,
        seq INTEGER NOT NULL,
        field TEXT NOT NULL,
        valid INTEGER NOT NULL,
        PRIMARY KEY (code, kid, seq, field)
    );
    CREATE TABLE chains (
        kid BLOB PRIMARY KEY,
        device TEXT NOT NULL,
        watermark INTEGER NOT NULL
    );
    CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        received_at REAL NOT NULL,
        topic TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        raw BLOB NOT NULL
    );
    CREATE INDEX quarantine_reason ON quarantine (reason, received_at);
    """,
)


class StoreError(ValueError):
    """A request the record refuses (e.g. enrolling a key twice); the message says what to do instead."""


@dataclass(frozen=True)
class CommitResult:
    stored: int
    duplicates: int
    quarantined: int
    watermarks: dict[bytes, tuple[str, int]]  # kid -> (device, watermark) for every chain touched


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()  # one connection, used by the intake and the CLI's threads
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self.migrate()

    def close(self) -> None:
        self._db.close()

    def migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in filter(str.strip, script.split(";")):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {number}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    # -- registry ---------------------------------------------------------------------------------

    def enroll(self, device: str, role: str, public: PublicKey, org: str | None, at: float) -> KeyRecord:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT role FROM devices WHERE device = ?", (device,)).fetchone()
                if row and row[0] != role:
                    raise StoreError(f"{device} is already enrolled as {row[0]}; a device has one role")
                if row:
                    raise StoreError(f"{device} is already enrolled; to give it a new key, rotate it")
                if db.execute("SELECT 1 FROM keys WHERE kid = ?", (public.kid,)).fetchone():
                    raise StoreError(f"key {public.kid.hex()} is already enrolled")
                db.execute(
                    "INSERT INTO devices (device, role, org, enrolled_at) VALUES (?, ?, ?, ?)",
                    (device, role, org, at),
                )
                db.execute(
                    "INSERT INTO keys (kid, device, public_key, valid_from) VALUES (?, ?, ?, ?)",
                    (public.kid, device, public.raw, at),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return KeyRecord(public.kid, device, role, public, "active", at, None, None)

    def key(self, kid: bytes) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT k.kid, k.device, d.role, k.public_key, k.state, k.valid_from, k.valid_until, k.revoked_at "
                "FROM keys k JOIN devices d USING (device) WHERE k.kid = ?",
                (kid,),
            ).fetchone()
        if row is None:
            return None
        return KeyRecord(row[0], row[1], row[2], PublicKey(row[3]), *row[4:])

    def devices(self) -> list[dict[str, object]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT d.device, d.role, d.org, d.enrolled_at, k.kid, k.public_key, k.state, "
                "COALESCE(c.watermark, 0), (SELECT COUNT(*) FROM events e WHERE e.kid = k.kid) "
                "FROM devices d JOIN keys k USING (device) LEFT JOIN chains c ON c.kid = k.kid "
                "ORDER BY d.device, k.valid_from"
            ).fetchall()
        return [
            {
                "device": r[0],
                "role": r[1],
                "org": r[2],
                "enrolled_at": r[3],
                "kid": r[4].hex(),
                "public_key": r[5].hex(),
                "key_state": r[6],
                "watermark": r[7],
                "events": r[8],
            }
            for r in rows
        ]

    # -- intake -----------------------------------------------------------------------------------

    def commit(self, accepted: Iterable[Accepted], rejected: Iterable[Rejected], at: float) -> CommitResult:
        """Store a batch in one transaction: valid events once each, rejects into quarantine."""
        stored = duplicates = quarantined = 0
        touched: dict[bytes, str] = {}
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for item in accepted:
                    ev = item.event
                    touched[item.kid] = ev.device
                    cur = db.execute(
                        "INSERT INTO events (kid, seq, device, type, vin, device_time_ms, received_at, hash, prev, "
                        "envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kid, seq) DO NOTHING",
                        (
                            item.kid,
                            ev.seq,
                            ev.device,
                            ev.type,
                            ev.fields.get("vin"),
                            ev.time_ms,
                            at,
                            item.envelope.hash,
                            ev.prev,
                            item.envelope.raw,
                        ),
                    )
                    if cur.rowcount == 0:
                        duplicates += 1
                        continue
                    stored += 1
                    bad = {p.path for p in item.code_problems}
                    db.executemany(
                        "INSERT INTO event_codes (code, kid, seq, field, valid) VALUES (?, ?, ?, ?, ?)",
                        [(code, item.kid, ev.seq, path, path not in bad) for path, code in ev.codes()],
                    )
                for r in rejected:
                    db.execute(
                        "INSERT INTO quarantine (received_at, topic, reason, detail, raw) VALUES (?, ?, ?, ?, ?)",
                        (at, r.topic, r.reason, r.detail, r.raw),
                    )
                    quarantined += 1
                watermarks = {kid: (device, self._advance(kid, device)) for kid, device in touched.items()}
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return CommitResult(stored, duplicates, quarantined, watermarks)

    def _advance(self, kid: bytes, device: str) -> int:
        """Move a chain's watermark over every contiguous stored sequence number."""
        db = self._db
        row = db.execute("SELECT watermark FROM chains WHERE kid = ?", (kid,)).fetchone()
        watermark = row[0] if row else 0
        for (seq,) in db.execute("SELECT seq FROM events WHERE kid = ? AND seq > ? ORDER BY seq", (kid, watermark)):
            if seq != watermark + 1:
                break
            watermark = seq
        db.execute(
            "INSERT INTO chains (kid, device, watermark) VALUES (?, ?, ?) "
            "ON CONFLICT (kid) DO UPDATE SET watermark = excluded.watermark",
            (kid, device, watermark),
        )
        return watermark

    # -- queries ----------------------------------------------------------------------------------

    def counts(self) -> dict[str, object]:
        with self._lock:
            events = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            by_reason = dict(self._db.execute("SELECT reason, COUNT(*) FROM quarantine GROUP BY reason").fetchall())
        return {"events": events, "rejected": by_reason}

    def envelopes(self, device: str) -> list[bytes]:
        """A device's stored envelopes in chain order, exactly as they were received."""
        with self._lock:
            rows = self._db.execute(
                "SELECT envelope FROM events WHERE device = ? ORDER BY kid, seq", (device,)
            ).fetchall()
        return [r[0] for r in rows]
