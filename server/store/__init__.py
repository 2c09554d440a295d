"""The record: one ``Store`` with the same semantics on SQLite (embedded) and PostgreSQL (production).

``Store(url)`` opens ``sqlite:PATH`` or ``postgresql://...`` and applies any pending migrations. The
registry, the intake's batch commit, the time-based sweep and the queries all go through it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from battery_trace.protocol.keys import PublicKey
from battery_trace.protocol.text import escaped
from battery_trace.server.records import Accepted, KeyRecord, Rejected
from battery_trace.server.store import queries, record, registry, retention
from battery_trace.server.store.db import Database, StoreError, StoreUnavailable
from battery_trace.server.store.record import CommitResult, RuleSettings
from battery_trace.server.store.retention import QuarantineLimits

__all__ = ["CommitResult", "QuarantineLimits", "RuleSettings", "Store", "StoreError", "StoreUnavailable"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    raised: int  # time-based findings raised (unaccounted, sequence gaps)
    dropped: dict[str, int]  # quarantine rows retention dropped, per reason


class Store:
    def __init__(self, url: str, rules: RuleSettings | None = None, quarantine: QuarantineLimits | None = None) -> None:
        self.db = Database(url)
        self.rules = rules or RuleSettings()
        self.quarantine = quarantine or QuarantineLimits()
        self.db.migrate()

    @property
    def url(self) -> str:
        return self.db.url

    def close(self) -> None:
        self.db.close()

    # -- registry ---------------------------------------------------------------------------------

    def enroll(self, device: str, role: str, public: PublicKey, org: str | None, at: float) -> KeyRecord:
        with self.db.transaction() as tx:
            return registry.enroll(tx, device, role, public, org, at)

    def rotate(self, device: str, public: PublicKey, at: float) -> KeyRecord:
        with self.db.transaction() as tx:
            return registry.rotate(tx, device, public, at)

    def revoke(self, target: str, at: float) -> tuple[list[registry.Revocation], int]:
        """Revoke (or move a revocation earlier); returns what changed and how many stored events arrived
        after ``at`` (now flagged)."""
        with self.db.transaction() as tx:
            revoked = registry.revoke(tx, target, at)
            flagged = record.flag_after_revocation(tx, [r.key.kid for r in revoked], at, time.time())
        return revoked, flagged

    def unrevoke(self, target: str, now: float, in_effect: bool = False) -> list[registry.Lifted]:
        """Lift a revocation; one already in effect only with ``in_effect`` (see registry.unrevoke)."""
        with self.db.transaction() as tx:
            return registry.unrevoke(tx, target, now, in_effect)

    def key(self, kid: bytes) -> KeyRecord | None:
        with self.db.reading() as tx:
            return registry.key(tx, kid)

    def keys(self, kids: Iterable[bytes]) -> dict[bytes, KeyRecord]:
        """The intake's key lookups, through a connection of their own: a dashboard's long read on the
        shared reader never holds up a batch."""
        with self.db.reading(intake=True) as tx:
            return registry.keys(tx, kids)

    def devices(self) -> list[dict[str, object]]:
        with self.db.reading() as tx:
            return registry.devices(tx)

    # -- intake -----------------------------------------------------------------------------------

    def commit(self, accepted: Iterable[Accepted], rejected: Iterable[Rejected], at: float) -> CommitResult:
        """Store a batch in one transaction: valid events once each, rejects into quarantine, findings.

        One message never stops a batch (DESIGN.md §7.4). Should the database refuse the batch for a
        reason other than being unreachable — a value that passed verification but that this backend
        cannot hold — the batch is split until the event it refuses is alone; that event goes to
        quarantine as ``store_refused`` and everything else is stored, in arrival order, so the
        first-arrival rule for forks still holds."""
        items, refused = list(accepted), list(rejected)
        try:
            return self._commit(items, refused, at)
        except self.db.data_errors:
            log.exception("the store refused a batch of %d events; isolating the event it refuses", len(items))
            return self._isolate(items, refused, at)

    def _commit(self, accepted: list[Accepted], rejected: list[Rejected], at: float) -> CommitResult:
        with self.db.transaction() as tx:
            return record.commit(tx, accepted, rejected, at, self.rules)

    def _isolate(self, items: list[Accepted], rejected: list[Rejected], at: float) -> CommitResult:
        results: list[CommitResult] = []
        refused: list[Rejected] = []

        def attempt(part: list[Accepted]) -> None:
            try:
                results.append(self._commit(part, [], at))
            except self.db.data_errors as exc:
                if len(part) == 1:
                    refused.append(record.store_refused(part[0], exc))
                    return
                attempt(part[: len(part) // 2])
                attempt(part[len(part) // 2 :])

        if items:
            attempt(items)
        results.append(self._quarantine_each([*rejected, *refused], at))
        return record.merged(results, refused)

    def _quarantine_each(self, rejected: list[Rejected], at: float) -> CommitResult:
        """Quarantine rows are escaped text and raw bytes, which every backend holds; should one still
        be refused, each goes in on its own, the refused one with only what cannot fail."""
        try:
            return self._commit([], rejected, at)
        except self.db.data_errors:
            log.exception("the store refused quarantine rows; storing them one by one")
        results = []
        for r in rejected:
            try:
                results.append(self._commit([], [r], at))
            except self.db.data_errors as exc:
                bare = Rejected(
                    escaped(r.topic, 512), r.raw, r.reason, f"the detail could not be stored ({type(exc).__name__})"
                )
                results.append(self._commit([], [bare], at))
        return record.merged(results, [])

    def sweep(self, now: float | None = None) -> Sweep:
        """Time-based work: the rules' sweep, and the quarantine's retention (its drops are counted)."""
        at = time.time() if now is None else now
        with self.db.transaction() as tx:
            raised = record.sweep(tx, at, self.rules)
            dropped = retention.prune_quarantine(tx, at, self.quarantine)
        if dropped:
            log.info("quarantine retention dropped rejected messages (counted in quarantine_dropped): %s", dropped)
        return Sweep(raised, dropped)

    # -- queries ----------------------------------------------------------------------------------

    def counts(self) -> dict[str, object]:
        with self.db.reading() as tx:
            return queries.counts(tx)

    def chain(self, kid: bytes) -> list[tuple[int, bytes]]:
        """A key's stored (seq, envelope) in sequence order, the envelopes exactly as received."""
        with self.db.reading() as tx:
            return queries.chain(tx, kid)

    def findings(self, open_only: bool = False, kind: str | None = None, subject: str | None = None) -> list[dict]:
        with self.db.reading() as tx:
            return queries.findings(tx, open_only, kind, subject)

    def findings_page(
        self,
        open_only: bool = False,
        kind: str | None = None,
        limit: int = queries.PAGE,
        before: int | None = None,
        subject: str | None = None,
    ) -> queries.Page:
        with self.db.reading() as tx:
            return queries.findings_page(tx, open_only, kind, subject, limit, before)

    def trace(self, code: str, limit: int = queries.PAGE, after: Any = None, lifecycle: bool = False) -> dict | None:
        with self.db.reading() as tx:
            return queries.trace(tx, code, limit, after, lifecycle)

    def vehicle(self, vin: str, limit: int = queries.PAGE, after: Any = None) -> dict | None:
        with self.db.reading() as tx:
            return queries.vehicle(tx, vin, limit, after)

    def device(self, device: str) -> dict | None:
        with self.db.reading() as tx:
            return queries.device(tx, device)

    def device_keys(self, device: str) -> list[KeyRecord]:
        with self.db.reading() as tx:
            return registry.device_keys(tx, device)

    def rejects(
        self, reason: str | None = None, since: float | None = None, limit: int = 100, before: int | None = None
    ) -> list[dict]:
        with self.db.reading() as tx:
            return queries.rejects(tx, reason, since, limit, before)

    def record_status(self, device: str, status: dict[str, Any], at: float) -> None:
        """What a device says on its retained status topic; kept for the dashboard, not as evidence."""

        def num(key: str) -> float | None:
            value = status.get(key)
            return value if isinstance(value, int | float) and not isinstance(value, bool) else None

        state = status.get("state") if status.get("state") in ("online", "offline") else "unknown"
        alarm = status.get("alarm") if isinstance(status.get("alarm"), str) else None
        reported = num("time")
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO device_status (device, state, backlog, oldest_unreceipted_s, alarm, reported_at, "
                "received_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET state = excluded.state, "
                "backlog = COALESCE(excluded.backlog, device_status.backlog), "
                "oldest_unreceipted_s = COALESCE(excluded.oldest_unreceipted_s, device_status.oldest_unreceipted_s), "
                "alarm = excluded.alarm, reported_at = excluded.reported_at, received_at = excluded.received_at",
                (
                    device,
                    state,
                    num("backlog"),
                    num("oldest_unreceipted_s"),
                    alarm,
                    reported / 1000 if reported else None,
                    at,
                ),
            )

    def overview(self, now: float, window_s: float = 1800, bucket_s: float = 10) -> dict[str, Any]:
        with self.db.reading() as tx:
            return queries.overview(tx, now, window_s, bucket_s)

    def devices_overview(self, limit: int = queries.MAX_PAGE, after: str | None = None) -> queries.Page:
        with self.db.reading() as tx:
            return queries.devices_overview(tx, limit, after)

    def export(self, since: float, until: float, by_time: bool = False) -> Iterator[tuple]:
        """Rows (device, kid, seq, type, vin, time_ms, received_at, fields, hash, envelope), streamed."""
        with self.db.reading() as tx:
            yield from queries.export_rows(tx, since, until, by_time)
