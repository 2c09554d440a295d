"""Binding a BMS's secondary identity to the battery's GB/T 34014 code, once, on disk.

A BMS rarely reports the 24-character code: GB/T 27930's BRM carries manufacturer + pack serial +
production date, a JBD reports a model string. When such a secondary identity and a code are seen
together (a label scanned at the slot, a DBC frame, a Daly 0x57 answer), the pair is stored; from
then on the secondary identity alone is enough, even after a restart. A binding is never silently
replaced: a different code for a bound secondary identity is a conflict, logged and counted, and the
first binding stands until a person removes it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    secondary TEXT PRIMARY KEY,
    code TEXT NOT NULL,
    source TEXT NOT NULL,
    bound_at REAL NOT NULL
)
"""


class Bindings:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()
        self._cache: dict[str, str] = dict(self._db.execute("SELECT secondary, code FROM bindings").fetchall())
        self.counters: Counter[str] = Counter()

    def code_for(self, secondary: str) -> str | None:
        return self._cache.get(secondary)

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
            try:
                self._db.execute(
                    "INSERT INTO bindings (secondary, code, source, bound_at) VALUES (?, ?, ?, ?)",
                    (secondary, code, source, time.time()),
                )
            except sqlite3.Error as exc:  # a full disk: bound for this run, so the reading is not lost
                self.counters["unsaved"] += 1
                log.error(
                    "binding %s to %s kept in memory only (%s); scan the label again after a restart",
                    secondary,
                    code,
                    exc,
                )
            self._cache[secondary] = code
            self.counters["bound"] += 1
            log.info("bound %s to %s (from %s)", secondary, code, source)
            return True

    def close(self) -> None:
        self._db.close()
