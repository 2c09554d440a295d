"""One connection to the record, SQLite or PostgreSQL, behind the same small interface.

SQL is written once with ``?`` parameters; the PostgreSQL dialect turns them into ``%s``. Writers take
the locks they need inside explicit transactions: SQLite serialises writers (``BEGIN IMMEDIATE``),
PostgreSQL locks rows (``FOR UPDATE``). A lost connection surfaces as ``StoreUnavailable``, which the
intake treats as "commit nothing, acknowledge nothing, try again"; the next use reconnects.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from battery_trace.server.store.schema import MIGRATIONS


class StoreError(ValueError):
    """A request the record refuses (e.g. enrolling a key twice); the message says what to do instead."""


class StoreUnavailable(RuntimeError):
    """The database cannot be reached or failed; nothing was committed."""


@dataclass(frozen=True)
class Dialect:
    name: str
    blob: str
    real: str
    serial_pk: str
    begin: str
    for_update: str

    def sql(self, text: str) -> str:
        return text if self.name == "sqlite" else text.replace("?", "%s")

    def floor(self, expr: str) -> str:
        """An integer floor of a non-negative number (PostgreSQL's CAST rounds, SQLite's truncates)."""
        return f"CAST(({expr}) AS INTEGER)" if self.name == "sqlite" else f"CAST(FLOOR({expr}) AS BIGINT)"


SQLITE = Dialect("sqlite", "BLOB", "REAL", "INTEGER PRIMARY KEY AUTOINCREMENT", "BEGIN IMMEDIATE", "")
POSTGRES = Dialect(
    "postgresql", "BYTEA", "DOUBLE PRECISION", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "BEGIN", " FOR UPDATE"
)


# Column types for Tx.rows and Tx.insert_rows, and PostgreSQL's names for them.
PG_TYPES = {"blob": "bytea", "bigint": "int8", "text": "text", "real": "float8", "bool": "bool"}


class Tx:
    """The statements of one transaction (or of one autocommitted read)."""

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self.dialect.sql(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if self.dialect.name == "sqlite":
            self.conn.executemany(sql, rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self.dialect.sql(sql), rows)

    def rows(self, types: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
        """A subquery whose result is ``rows`` (column types from ``PG_TYPES``) and its parameters,
        to join with or to use after IN. PostgreSQL gets one array per column through ``unnest``: a
        statement with as many parameters as columns, which psycopg parses once (it parses every
        statement of over 50 parameters anew, in Python: ~3 ms per batch commit), sent in binary (as text,
        each bytea item goes through a regular expression: 3.1 ms for 500 pairs, binary 0.75). SQLite: a
        VALUES list."""
        if self.dialect.name == "sqlite":
            row = f"({', '.join('?' * len(types))})"
            return f"VALUES {', '.join([row] * len(rows))}", [v for r in rows for v in r]
        arrays = ", ".join(f"%b::{PG_TYPES[t]}[]" for t in types)  # binary: text arrays escape per item
        return f"SELECT * FROM unnest({arrays})", [list(column) for column in zip(*rows, strict=True)]

    def insert_rows(self, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]) -> None:
        """Plain inserts of many rows (no ON CONFLICT); ``columns`` are (name, type from ``PG_TYPES``).
        PostgreSQL takes them by binary COPY: psycopg's executemany spends about 22 µs of Python per
        row on the collector's hot path, text COPY 12 µs per event row, binary COPY 8."""
        if not rows:
            return
        names = ", ".join(name for name, _ in columns)
        if self.dialect.name == "sqlite":
            marks = ", ".join("?" for _ in columns)
            self.conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)
            return
        with self.conn.cursor() as cur, cur.copy(f"COPY {table} ({names}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([PG_TYPES[kind] for _, kind in columns])
            for row in rows:
                copy.write_row(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(_plain(v) for v in row) for row in self.execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, params).fetchone()
        return None if row is None else tuple(_plain(v) for v in row)

    def value(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]


def _plain(v: Any) -> Any:
    return bytes(v) if isinstance(v, memoryview) else v


class _Connection:
    """One lazily opened connection with its lock; dropped when it fails, reopened on next use."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.lock = threading.RLock()
        self.conn: Any = None

    def get(self) -> Any:
        conn = self.conn
        if conn is not None and self.db.dialect is POSTGRES and (conn.closed or conn.broken):
            self.conn = conn = None
        if conn is None:
            try:
                self.conn = conn = self.db.connect()
            except self.db.errors as exc:
                raise StoreUnavailable(f"cannot reach the store ({_first_line(exc)})") from None
        return conn

    def abandon(self) -> None:
        if self.conn is not None:
            with suppress(Exception):  # the connection is already unusable; closing is best effort
                self.conn.close()
        self.conn = None


class Database:
    """The record's database. Writes go through one connection, reads through others, so that key
    lookups and queries never wait behind a long batch commit (SQLite WAL and PostgreSQL both let a
    reader see the last committed state while a writer works). The intake's key lookups have a reader
    of their own: a polling dashboard on the shared one delayed them (median 0.64 s per batch)."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            self.dialect = POSTGRES
        elif url.startswith("sqlite:"):
            self.dialect = SQLITE
            self.path = Path(url.removeprefix("sqlite:").removeprefix("//"))
        else:
            raise StoreError(f"store URL {url!r} is not supported; valid: sqlite:PATH or postgresql://...")
        self._writer = _Connection(self)
        self._reader = _Connection(self)
        self._intake_reader = _Connection(self)

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        if self.dialect is SQLITE:
            return (sqlite3.OperationalError,)
        import psycopg

        return (psycopg.OperationalError, psycopg.InterfaceError)

    @property
    def data_errors(self) -> tuple[type[BaseException], ...]:
        """What a backend raises for a value it cannot hold (a constraint, a character, a number out of
        range): an error of the data, which isolating the message that carries it gets past. Anything
        else (a bug, a read-only standby, a privilege) is not the message's fault and stops the batch."""
        if self.dialect is SQLITE:
            return (sqlite3.IntegrityError, sqlite3.DataError, OverflowError, UnicodeError)
        import psycopg

        return (psycopg.DataError, psycopg.IntegrityError, OverflowError, UnicodeError)

    def connect(self) -> Any:
        if self.dialect is SQLITE:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        slot = self._writer
        with slot.lock:
            conn = slot.get()
            try:
                conn.execute(self.dialect.begin)
                yield Tx(conn, self.dialect)
                conn.execute("COMMIT")
            except self.errors as exc:
                slot.abandon()
                raise StoreUnavailable(f"the store failed mid-transaction ({_first_line(exc)})") from None
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except self.errors:
                    slot.abandon()
                raise

    @contextmanager
    def reading(self, *, intake: bool = False) -> Iterator[Tx]:
        """Autocommitted reads of the last committed state (``intake``: on the intake's own connection)."""
        slot = self._intake_reader if intake else self._reader
        with slot.lock:
            conn = slot.get()
            try:
                yield Tx(conn, self.dialect)
            except self.errors as exc:
                slot.abandon()
                raise StoreUnavailable(f"the store failed while reading ({_first_line(exc)})") from None

    def close(self) -> None:
        for slot in (self._writer, self._reader, self._intake_reader):
            with slot.lock:
                if slot.conn is not None:
                    slot.conn.close()
                    slot.conn = None

    def migrate(self) -> None:
        types = {"blob": self.dialect.blob, "real": self.dialect.real, "serial_pk": self.dialect.serial_pk}
        with self.transaction() as tx:
            tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if self.dialect is POSTGRES:
                tx.execute("LOCK TABLE schema_version IN EXCLUSIVE MODE")  # two collectors starting at once
            version = tx.value("SELECT MAX(version) FROM schema_version") or 0
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.format(**types).split(";")):
                    tx.execute(statement)
                tx.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))

    def version(self) -> int:
        with self.reading() as tx:
            return tx.value("SELECT MAX(version) FROM schema_version") or 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
