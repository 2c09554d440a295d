"""Versioned migrations, written once for both backends.

Type names differ between SQLite and PostgreSQL (``BLOB``/``BYTEA``, ``REAL``/``DOUBLE PRECISION``,
the auto-numbered key), so the DDL uses ``{placeholders}`` that each dialect fills in; everything else
is the same SQL, which keeps the two backends' semantics from drifting apart. A migration is
applied once, in a transaction, and recorded in ``schema_version``; never edit one that has shipped,
add the next.
"""

from __future__ import annotations

MIGRATIONS: tuple[str, ...] = (
    # 1: registry, append-only events, chains, quarantine. ``envelope`` is the evidence, exactly as
    # received; queries read an event's fields from it rather than from a copy.
    """
    CREATE TABLE devices (
        device TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        org TEXT,
        enrolled_at {real} NOT NULL
    );
    CREATE TABLE keys (
        kid {blob} PRIMARY KEY,
        device TEXT NOT NULL REFERENCES devices (device),
        public_key {blob} NOT NULL UNIQUE,
        state TEXT NOT NULL,
        valid_from {real} NOT NULL,
        valid_until {real},
        revoked_at {real}
    );
    CREATE INDEX keys_device ON keys (device);
    CREATE TABLE events (
        kid {blob} NOT NULL,
        seq BIGINT NOT NULL,
        device TEXT NOT NULL,
        type TEXT NOT NULL,
        vin TEXT,
        device_time_ms BIGINT NOT NULL,
        received_at {real} NOT NULL,
        hash {blob} NOT NULL,
        prev {blob} NOT NULL,
        envelope {blob} NOT NULL,
        PRIMARY KEY (kid, seq)
    );
    CREATE INDEX events_device_time ON events (device, device_time_ms);
    CREATE INDEX events_vin ON events (vin, device_time_ms);
    CREATE INDEX events_received ON events (received_at);
    CREATE TABLE event_codes (
        code TEXT NOT NULL,
        kid {blob} NOT NULL,
        seq BIGINT NOT NULL,
        field TEXT NOT NULL,
        type TEXT NOT NULL,
        device_time_ms BIGINT NOT NULL,
        valid BOOLEAN NOT NULL,
        PRIMARY KEY (code, kid, seq, field)
    );
    CREATE INDEX event_codes_time ON event_codes (code, device_time_ms);
    CREATE INDEX event_codes_event ON event_codes (kid, seq);
    CREATE TABLE chains (
        kid {blob} PRIMARY KEY,
        device TEXT NOT NULL,
        watermark BIGINT NOT NULL,
        max_seq BIGINT NOT NULL,
        last_received_at {real} NOT NULL
    );
    CREATE TABLE quarantine (
        id {serial_pk},
        received_at {real} NOT NULL,
        topic TEXT NOT NULL,
        device TEXT,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        raw {blob} NOT NULL
    );
    CREATE INDEX quarantine_reason ON quarantine (reason, received_at);
    CREATE INDEX quarantine_time ON quarantine (received_at);
    """,
    # 2: derived state (batteries, vehicles) and findings
    """
    CREATE TABLE batteries (
        code TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        vin TEXT,
        place TEXT,
        out_of_service_ms BIGINT,
        final_ms BIGINT,
        last_event_ms BIGINT NOT NULL,
        last_received_at {real} NOT NULL
    );
    CREATE INDEX batteries_vin ON batteries (vin);
    CREATE TABLE vehicles (
        vin TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        batteries TEXT NOT NULL,
        last_event_ms BIGINT NOT NULL
    );
    CREATE TABLE findings (
        id {serial_pk},
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        ref_kid {blob},
        ref_seq BIGINT,
        detail TEXT NOT NULL,
        raised_at {real} NOT NULL,
        resolved_at {real},
        UNIQUE (kind, subject, ref_kid, ref_seq)
    );
    CREATE INDEX findings_open ON findings (resolved_at, kind);
    CREATE INDEX findings_subject ON findings (subject);
    """,
    # 3: what devices last said about themselves on their retained status topic (not evidence)
    """
    CREATE TABLE device_status (
        device TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        backlog BIGINT,
        oldest_unreceipted_s {real},
        alarm TEXT,
        reported_at {real},
        received_at {real} NOT NULL
    );
    """,
    # 4: a bounded quarantine. An oversized message keeps only a prefix, so its full size and hash are
    # kept beside it; what retention drops is counted per reason; the dashboard's per-device lookups
    # go through indexes (200,000 junk rows made the devices overview take 0.76 s).
    """
    ALTER TABLE quarantine ADD COLUMN size BIGINT;
    ALTER TABLE quarantine ADD COLUMN sha256 {blob};
    CREATE INDEX quarantine_device ON quarantine (device, received_at);
    CREATE INDEX chains_device ON chains (device);
    CREATE TABLE quarantine_dropped (
        reason TEXT PRIMARY KEY,
        messages BIGINT NOT NULL,
        bytes BIGINT NOT NULL,
        last_at {real} NOT NULL
    );
    """,
    # 5: a batch's cost independent of history. What the rules read of a lifecycle event is kept beside
    # it (facts, JSON; older rows are filled in when first read); each battery and vehicle row keeps the
    # order key of the last lifecycle event applied to it, so an event arriving in order is one step from
    # the stored state instead of a replay; lifecycle rows of a code are found without reading its health.
    # A receipt's watermark now stops before a broken link (its hash vouches for every event up to it):
    # a watermark from before that rule which spans one is brought back before it.
    """
    ALTER TABLE events ADD COLUMN facts TEXT;
    ALTER TABLE batteries ADD COLUMN applied_ms BIGINT;
    ALTER TABLE batteries ADD COLUMN applied_received {real};
    ALTER TABLE batteries ADD COLUMN applied_kid {blob};
    ALTER TABLE batteries ADD COLUMN applied_seq BIGINT;
    ALTER TABLE vehicles ADD COLUMN applied_ms BIGINT;
    ALTER TABLE vehicles ADD COLUMN applied_received {real};
    ALTER TABLE vehicles ADD COLUMN applied_kid {blob};
    ALTER TABLE vehicles ADD COLUMN applied_seq BIGINT;
    CREATE INDEX event_codes_lifecycle ON event_codes (code, type) WHERE type <> 'health';
    UPDATE chains SET watermark = (
        SELECT MIN(f.ref_seq) - 1 FROM findings f WHERE f.kind = 'chain_break' AND f.ref_kid = chains.kid
        AND f.ref_seq <= chains.watermark AND f.detail LIKE '%%does not link%%'
    ) WHERE EXISTS (
        SELECT 1 FROM findings f WHERE f.kind = 'chain_break' AND f.ref_kid = chains.kid
        AND f.ref_seq <= chains.watermark AND f.detail LIKE '%%does not link%%'
    );
    """,
    # 6: a battery's events a page at a time, in time order, without a sort: 99,999 health snapshots
    # of one battery took 3.6 s and 853 MB to answer whole; a page now reads only its own rows. It serves
    # every lookup by (code, time) too, so the index of migration 1 on those two goes: one index less
    # to write for every stored code (the collector's commit was a fifth slower with both).
    """
    CREATE INDEX event_codes_page ON event_codes (code, device_time_ms, kid, seq, type);
    DROP INDEX event_codes_time;
    """,
)
