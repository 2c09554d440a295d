"""Binding a BMS's secondary identity to the battery's GB/T 34014 code, once, on disk.

A BMS rarely reports the 24-character code: GB/T 27930's BRM carries manufacturer + pack serial +
production date. When such a secondary identity and a code are seen together (a label scanned at the
slot, a DBC frame, a Daly 0x57 answer), the pair is stored; from then on the secondary identity alone
is enough, even after a restart.

A secondary identity is only worth binding while it names one pack. Cheap BMS firmware sends
constants, so one that is seen with a second code, or on two slots at once, is **distrusted**: stored
as such, counted, an alarm, and never used again (its packs need their label scanned) until a person
has looked and removed it with ``battery-agent bindings remove``. A binding is never silently replaced.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS bindings (
    secondary TEXT PRIMARY KEY,
    code TEXT NOT NULL,
    source TEXT NOT NULL,
    bound_at REAL NOT NULL
)
""",
    """
CREATE TABLE IF NOT EXISTS distrusted (
    secondary TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at REAL NOT NULL
)
""",
)


def open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    for statement in SCHEMA:
        db.execute(statement)
    return db


class Bindings:
    def __init__(self, path: Path) -> None:
        self._db = open_db(path)
        self._lock = threading.Lock()
        self._cache: dict[str, str] = dict(self._db.execute("SELECT secondary, code FROM bindings").fetchall())
        self._distrusted: dict[str, str] = dict(self._db.execute("SELECT secondary, reason FROM distrusted").fetchall())
        self.counters: Counter[str] = Counter()

    def code_for(self, secondary: str) -> str | None:
        return self._cache.get(secondary)

    def distrusted(self, secondary: str) -> bool:
        return secondary in self._distrusted

    @property
    def alarm(self) -> str | None:
        """What a person must look at: secondary identities that turned out not to be unique."""
        if not self._distrusted:
            return None
        shown = "; ".join(f"{s} ({why})" for s, why in sorted(self._distrusted.items())[:3])
        more = f" and {len(self._distrusted) - 3} more" if len(self._distrusted) > 3 else ""
        return (
            f"{len(self._distrusted)} BMS identities are not unique and no longer used: {shown}{more}; "
            "scan those packs' labels, see `battery-agent bindings list`"
        )

    def bind(self, secondary: str, code: str, source: str) -> bool:
        """Store the pair; False (and a counted conflict) when the secondary identity is bound elsewhere."""
        with self._lock:
            known = self._cache.get(secondary)
            if known == code:
                return True
            if known is not None:
                self.counters["conflicts"] += 1
                log.warning("%s is bound to %s; refusing to rebind it to %s (from %s)", secondary, known, code, source)
                return False
            self._write(
                "INSERT INTO bindings (secondary, code, source, bound_at) VALUES (?, ?, ?, ?)",
                (secondary, code, source, time.time()),
                f"binding {secondary} to {code}",
            )
            self._cache[secondary] = code
            self.counters["bound"] += 1
            log.info("bound %s to %s (from %s)", secondary, code, source)
            return True

    def distrust(self, secondary: str, reason: str) -> None:
        """Never use ``secondary`` as an identity again (its binding, if any, is kept for the person to see)."""
        with self._lock:
            if secondary in self._distrusted:
                return
            self._write(
                "INSERT OR REPLACE INTO distrusted (secondary, reason, at) VALUES (?, ?, ?)",
                (secondary, reason, time.time()),
                f"distrusting {secondary}",
            )
            self._distrusted[secondary] = reason
            self.counters["distrusted"] += 1
            log.error("%s is not one pack's identity (%s): no code is taken from it any more", secondary, reason)

    def _write(self, sql: str, params: tuple[object, ...], what: str) -> None:
        try:
            self._db.execute(sql, params)
        except sqlite3.Error as exc:  # a full disk: kept for this run, so the reading is not lost
            self.counters["unsaved"] += 1
            log.error("%s kept in memory only (%s); it is lost at a restart", what, exc)

    def close(self) -> None:
        self._db.close()


def listing(db: sqlite3.Connection) -> list[dict[str, object]]:
    """Every secondary identity the agent knows, bound or distrusted, for the person who decides."""
    rows = db.execute(
        "SELECT s.secondary, b.code, b.source, b.bound_at, d.reason, d.at FROM "
        "(SELECT secondary FROM bindings UNION SELECT secondary FROM distrusted) s "
        "LEFT JOIN bindings b ON b.secondary = s.secondary LEFT JOIN distrusted d ON d.secondary = s.secondary "
        "ORDER BY s.secondary"
    ).fetchall()
    return [
        {"secondary": s, "code": code, "source": source, "bound_at": bound, "distrusted": reason, "distrusted_at": at}
        for s, code, source, bound, reason, at in rows
    ]


def remove(db: sqlite3.Connection, secondary: str) -> bool:
    """Forget a secondary identity's binding and distrust; False when it was not known."""
    db.execute("BEGIN IMMEDIATE")
    gone = db.execute("DELETE FROM bindings WHERE secondary = ?", (secondary,)).rowcount
    gone += db.execute("DELETE FROM distrusted WHERE secondary = ?", (secondary,)).rowcount
    db.execute("COMMIT")
    return bool(gone)
