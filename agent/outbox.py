"""The outbox: sealed events on the agent's disk until a server receipt covers them.

SQLite in WAL mode with ``synchronous=FULL``: an event exists once its transaction commits, and a
power cut after that cannot lose it. The chain head (last sequence number and envelope hash per key)
lives in the same database and moves in the same transaction as the event, so a crash can never
reuse a sequence number or break the hash chain, even after every event has been pruned.

Its size is what its rows take (pages in use), so that pruning shows at once; the space pruning frees
goes back to the filesystem in batches (incremental vacuum, then a checkpoint that truncates the
write-ahead log), so that one long outage does not leave a file the size of its backlog for good.

Every failure of the database reaches callers as one ``OutboxError`` naming the path and SQLite's own
reason: a full disk (``full``), a corrupt file, a folder that cannot be made, a read-only filesystem.

The swap station's bay (the swap in progress, the swaps finishing) is kept here too, written with the
same durability as a seal, so a restart resumes it; so is the evidence of every swap that could not be
sealed as a whole. The schema carries its version (``PRAGMA user_version``): an outbox from before
versions (0) is migrated in one transaction, one from a newer agent is refused rather than misread.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from battery_trace.protocol.envelope import envelope_hash
from battery_trace.protocol.events import ZERO_HASH

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS chain (
    kid BLOB PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    kid BLOB NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    envelope BLOB NOT NULL,
    sealed_at REAL NOT NULL,
    PRIMARY KEY (kid, seq)
);
-- Server keys the agent learned from receipts signed by a key it already trusted (a rotation).
CREATE TABLE IF NOT EXISTS server_keys (
    public_key BLOB NOT NULL,
    vouched_by BLOB NOT NULL,  -- the configured key whose receipt announced it
    learned_at REAL NOT NULL,
    PRIMARY KEY (public_key, vouched_by)
);
CREATE TABLE IF NOT EXISTS bay (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL,
    saved_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS swap_evidence (
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    swap TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    position: int  # sealing order across keys (SQLite rowid: always increasing among rows present)
    kid: bytes
    seq: int
    type: str
    envelope: bytes
    sealed_at: float


# Builds the envelope for (seq, prev hash) and returns (envelope bytes, its hash, event type).
Builder = Callable[[int, bytes], tuple[bytes, bytes, str]]


class OutboxError(Exception):
    """The outbox cannot be opened or written. ``full``: because its filesystem has no space left, which
    freeing space cures; anything else needs a person (a corrupt file, a read-only disk, a bad path)."""

    def __init__(self, path: Path, doing: str, exc: BaseException) -> None:
        self.full = isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        reason = "disk full" if self.full else (exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
        super().__init__(f"outbox {path}: cannot {doing}: {reason}")


class NewerSchema(Exception):
    """The outbox was written by a newer agent: reading it with this one could misread it."""


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(path, "open it", exc) from None
        try:
            self._reclaimable()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
            # Reading every event's row and every chain head once finds a corrupt or truncated file now,
            # with a clear message, rather than at the first seal or receipt.
            self._db.execute("SELECT COUNT(*), MIN(sealed_at), SUM(LENGTH(envelope)) FROM outbox").fetchone()
            self._db.execute("SELECT COUNT(*), MAX(last_seq) FROM chain").fetchone()
        except sqlite3.Error as exc:
            self._db.close()
            raise OutboxError(
                path, "use it (restore it from a backup, or move it aside to start a new one)", exc
            ) from None
        except NewerSchema as exc:
            self._db.close()
            raise OutboxError(path, "use it", exc) from None

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION in one transaction (every statement is idempotent)."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise NewerSchema(
                f"its schema is version {version}, written by a newer battery-agent; this one knows up to "
                f"{SCHEMA_VERSION} (upgrade this agent, or restore the outbox this version wrote)"
            )
        if version == SCHEMA_VERSION:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, SCHEMA.split(";")):
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        if version:
            log.info("outbox %s: schema migrated from version %d to %d", self.path, version, SCHEMA_VERSION)

    def load_bay(self) -> str | None:
        """The swap station's bay as last saved (JSON), or None."""
        row = self._db.execute("SELECT state FROM bay WHERE id = 1").fetchone()
        return row[0] if row else None

    def save_bay(self, state: str) -> None:
        """Replace the saved bay; committed (synchronous=FULL) before it returns, or OutboxError."""
        try:
            self._db.execute(
                "INSERT INTO bay (id, state, saved_at) VALUES (1, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET state = excluded.state, saved_at = excluded.saved_at",
                (state, time.time()),
            )
        except sqlite3.Error as exc:
            raise OutboxError(self.path, "save the swap bay", exc) from None

    def record_evidence(self, at: float, reason: str, swap: str) -> None:
        """Keep what is known of a swap that could not be sealed as a whole; OutboxError if the disk refuses."""
        try:
            self._db.execute("INSERT INTO swap_evidence (at, reason, swap) VALUES (?, ?, ?)", (at, reason, swap))
        except sqlite3.Error as exc:
            raise OutboxError(self.path, "keep the evidence of an unsealed swap", exc) from None

    def evidence_since(self, since: float) -> list[tuple[float, str]]:
        """(time, reason) of the swaps not sealed as a whole since ``since``, oldest first."""
        return self._db.execute("SELECT at, reason FROM swap_evidence WHERE at >= ? ORDER BY at", (since,)).fetchall()

    def unreceipted_of_type(self, event_type: str) -> list[bytes]:
        """Envelopes of one type still in the outbox: what a resumed swap checks it was not sealed already."""
        rows = self._db.execute("SELECT envelope FROM outbox WHERE type = ? ORDER BY rowid", (event_type,))
        return [row[0] for row in rows]

    # Space freed by pruning goes back to the filesystem once this much is free (and a quarter of the
    # file): one vacuum and checkpoint per batch of receipts, not per receipt.
    RECLAIM_PAGES = 256

    def _reclaimable(self) -> None:
        """Incremental vacuum, so that pruning can give space back. A new file takes it before its first
        table; an outbox from before needs one VACUUM (it rewrites the file: on a disk too full for that
        it stays as it was, says so, and tries again at the next start)."""
        if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            try:
                self._db.execute("VACUUM")
            except sqlite3.OperationalError as exc:
                log.warning("%s; pruned space stays in the file until it can", OutboxError(self.path, "vacuum", exc))

    def close(self) -> None:
        self._db.close()

    def append(self, kid: bytes, build: Builder) -> int:
        """Seal one event: take the next sequence number, build, store, move the head; all or nothing.
        Raises OutboxError when the database refuses the write; the head has then not moved."""
        try:
            return self._append(kid, build)
        except sqlite3.Error as exc:
            raise OutboxError(self.path, "seal", exc) from None

    def _append(self, kid: bytes, build: Builder) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT last_seq, last_hash FROM chain WHERE kid = ?", (kid,)).fetchone()
            last_seq, last_hash = row if row else (0, ZERO_HASH)
            seq = last_seq + 1
            envelope, envelope_hash, event_type = build(seq, last_hash)
            db.execute(
                "INSERT INTO outbox (kid, seq, type, envelope, sealed_at) VALUES (?, ?, ?, ?, ?)",
                (kid, seq, event_type, envelope, time.time()),
            )
            db.execute(
                "INSERT INTO chain (kid, last_seq, last_hash) VALUES (?, ?, ?) "
                "ON CONFLICT (kid) DO UPDATE SET last_seq = excluded.last_seq, last_hash = excluded.last_hash",
                (kid, seq, envelope_hash),
            )
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return seq

    def _rollback(self) -> None:
        """Undo what is left of a failed transaction, never hiding why it failed: SQLite has already
        rolled back by itself after SQLITE_FULL or an I/O error, and a failing ROLLBACK is only logged."""
        if not self._db.in_transaction:
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("outbox %s: rollback after a failed seal also failed: %s", self.path, exc)

    def head(self, kid: bytes) -> int:
        row = self._db.execute("SELECT last_seq FROM chain WHERE kid = ?", (kid,)).fetchone()
        return row[0] if row else 0

    def pending(self, limit: int = 100, beyond: dict[bytes, int] | None = None) -> list[Pending]:
        """Unreceipted events in sealing order; with ``beyond`` (per key, the highest sequence number
        already published), only those after it. Sequence numbers, not positions, mark what was sent:
        SQLite hands out row ids again once the outbox has been emptied."""
        marks = beyond or {}
        where = " AND ".join("NOT (kid = ? AND seq <= ?)" for _ in marks) or "1"
        params = [value for kid, seq in marks.items() for value in (kid, seq)]
        rows = self._db.execute(
            f"SELECT rowid, kid, seq, type, envelope, sealed_at FROM outbox WHERE {where} ORDER BY rowid LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [Pending(*row) for row in rows]

    def server_keys(self, vouched_by: bytes) -> list[bytes]:
        """Raw public keys learned from receipts the configured key ``vouched_by`` signed (that key is
        trusted besides these; keys another configured key once vouched for are not)."""
        rows = self._db.execute(
            "SELECT public_key FROM server_keys WHERE vouched_by = ? ORDER BY learned_at", (vouched_by,)
        )
        return [row[0] for row in rows]

    def learn_server_key(self, public_raw: bytes, vouched_by: bytes) -> bool:
        """Keep a server key a trusted receipt announced; True when it is new. A write the disk refuses
        is tried again with the next receipt that names it."""
        try:
            cur = self._db.execute(
                "INSERT INTO server_keys (public_key, vouched_by, learned_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (public_raw, vouched_by, time.time()),
            )
        except sqlite3.Error as exc:
            log.warning(
                "%s; the server's next key is learned from a later receipt", OutboxError(self.path, "learn", exc)
            )
            return False
        return cur.rowcount == 1

    def kids(self) -> set[bytes]:
        """Every key this outbox has sealed under: a rotated-out key's backlog is still receipted."""
        return {row[0] for row in self._db.execute("SELECT kid FROM chain")}

    def prune(self, kid: bytes, watermark: int, watermark_hash: bytes) -> int | None:
        """Delete what a verified receipt truly covers; returns how many events left the outbox. None
        when the receipt speaks of another chain under this key than this outbox's — it covers sequence
        numbers this outbox never sealed, or the server's event at the watermark is not this outbox's
        (a restored image, a cloned card): then nothing is deleted. The server's events up to the
        watermark each link to the one before, so one matching hash vouches for all of them. A delete the
        disk refuses prunes nothing: the events stay, are resent, and the next receipt covers them."""
        if watermark > self.head(kid):
            return None
        row = self._db.execute("SELECT envelope FROM outbox WHERE kid = ? AND seq = ?", (kid, watermark)).fetchone()
        if row is None:
            return 0  # the outbox holds a suffix of each chain: everything up to it has left already
        if envelope_hash(row[0]) != watermark_hash:
            return None
        try:
            cur = self._db.execute("DELETE FROM outbox WHERE kid = ? AND seq <= ?", (kid, watermark))
        except sqlite3.Error as exc:
            log.warning("%s; receipted events stay until a later receipt", OutboxError(self.path, "prune", exc))
            return 0
        self._reclaim()
        return cur.rowcount

    def _reclaim(self) -> None:
        """Give the pages pruning freed back to the filesystem, once there are enough of them."""
        pages, free = (self._pragma(p) for p in ("page_count", "freelist_count"))
        if free < max(self.RECLAIM_PAGES, pages // 4):
            return
        try:
            # executescript steps the pragma to the end; execute() would free one page per call.
            self._db.executescript("PRAGMA incremental_vacuum")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:  # space not given back yet: no event is at stake
            log.warning("%s", OutboxError(self.path, "reclaim pruned space", exc))

    def depth(self) -> tuple[int, float | None]:
        """(unreceipted events, sealing time of the oldest one)."""
        count, oldest = self._db.execute("SELECT COUNT(*), MIN(sealed_at) FROM outbox").fetchone()
        return count, oldest

    def size_bytes(self) -> int:
        """What the outbox's rows take: its pages in use, which pruning frees at once (the file and its
        write-ahead log shrink later, in batches, and the log never holds more than a checkpoint's worth)."""
        pages, free, page_size = (self._pragma(p) for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * page_size

    def file_bytes(self) -> int:
        """What the outbox takes on disk now: the database file and its write-ahead log."""
        files = (self.path, self.path.with_name(self.path.name + "-wal"))
        return sum(f.stat().st_size for f in files if f.exists())

    def _pragma(self, name: str) -> int:
        return self._db.execute(f"PRAGMA {name}").fetchone()[0]
