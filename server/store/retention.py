"""Bounding the quarantine: rejected messages are kept for inspection, not for ever and not without limit.

Anyone who can reach the broker can send junk, so what is kept of it must be bounded: by age (older
rows go) and by size (the oldest go first until the rest fit). Dropping is counted per reason in
``quarantine_dropped``, so the record still says how much was refused and when the last drop was. The
events themselves are evidence and are never touched here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from battery_trace.server.store.db import Tx

# Rows deleted per statement: bounded work per step, and a parameter list every backend takes.
_STEP = 1000


@dataclass(frozen=True)
class QuarantineLimits:
    max_age_days: float = 90.0
    max_bytes: int = 1 << 30  # of kept message bytes (oversized messages keep only a prefix)


def prune_quarantine(tx: Tx, now: float, limits: QuarantineLimits) -> dict[str, int]:
    """Drop quarantine rows past the age limit, then the oldest until the rest fit the size limit;
    returns how many rows went, per reason."""
    dropped: Counter[str] = Counter()
    dropped_bytes: Counter[str] = Counter()
    before = now - limits.max_age_days * 86400
    for reason, count, size in tx.all(
        "SELECT reason, COUNT(*), SUM(LENGTH(raw)) FROM quarantine WHERE received_at < ? GROUP BY reason", (before,)
    ):
        dropped[reason] += count
        dropped_bytes[reason] += size or 0
    tx.execute("DELETE FROM quarantine WHERE received_at < ?", (before,))
    total = tx.value("SELECT COALESCE(SUM(LENGTH(raw)), 0) FROM quarantine") or 0
    while total > limits.max_bytes:
        oldest = tx.all("SELECT id, reason, LENGTH(raw) FROM quarantine ORDER BY id LIMIT ?", (_STEP,))
        if not oldest:
            break
        chosen = []
        for row_id, reason, size in oldest:
            if total <= limits.max_bytes:
                break
            chosen.append(row_id)
            dropped[reason] += 1
            dropped_bytes[reason] += size
            total -= size
        marks = ", ".join("?" * len(chosen))
        tx.execute(f"DELETE FROM quarantine WHERE id IN ({marks})", chosen)
    tx.executemany(
        "INSERT INTO quarantine_dropped (reason, messages, bytes, last_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (reason) DO UPDATE SET messages = quarantine_dropped.messages + excluded.messages, "
        "bytes = quarantine_dropped.bytes + excluded.bytes, last_at = excluded.last_at",
        [(reason, n, dropped_bytes[reason], now) for reason, n in sorted(dropped.items())],
    )
    return dict(dropped)
