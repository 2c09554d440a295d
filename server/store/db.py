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

from server.store.schema import MIGRATIONS


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


SQLITE = Dialect("sqlite", "BLOB", "REAL", "INTEGER PRIMARY KEY AUTOINCREMENT", "BEGIN IMMEDIATE", "")
POSTGRES = Dialect(
    "postgresql", "BYTEA", "DOUBLE PRECISION", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "BEGIN", " FOR UPDATE"
)


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


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        self._conn: Any = None
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            self.dialect = POSTGRES
        elif url.startswith("sqlite:"):
            self.dialect = SQLITE
            self.path = Path(url.removeprefix("sqlite:").removeprefix("//"))
        else:
            raise StoreError(f"store URL {url!r} is not supported; valid: sqlite:PATH or postgresql://...")

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        if self.dialect is SQLITE:
            return (sqlite3.OperationalError,)
        import psycopg

        return (psycopg.OperationalError, psycopg.InterfaceError)

    def _connect(self) -> Any:
        if self.dialect is SQLITE:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def _connection(self) -> Any:
        if self._conn is not None and self.dialect is POSTGRES and (self._conn.closed or self._conn.broken):
            self._conn = None
        if self._conn is None:
            try:
                self._conn = self._connect()
            except self.errors as exc:
                raise StoreUnavailable(f"cannot reach the store ({_first_line(exc)})") from None
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(self.dialect.begin)
                tx = Tx(conn, self.dialect)
                yield tx
                conn.execute("COMMIT")
            except self.errors as exc:
                self._abandon(conn)
                raise StoreUnavailable(f"the store failed mid-transaction ({_first_line(exc)})") from None
            except BaseException:
                self._rollback(conn)
                raise

    @contextmanager
    def reading(self) -> Iterator[Tx]:
        with self._lock:
            conn = self._connection()
            try:
                yield Tx(conn, self.dialect)
            except self.errors as exc:
                self._abandon(conn)
                raise StoreUnavailable(f"the store failed while reading ({_first_line(exc)})") from None

    def _rollback(self, conn: Any) -> None:
        try:
            conn.execute("ROLLBACK")
        except self.errors:
            self._abandon(conn)

    def _abandon(self, conn: Any) -> None:
        with suppress(Exception):  # the connection is already unusable; closing is best effort
            conn.close()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

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
