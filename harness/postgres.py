"""A private PostgreSQL cluster (initdb + pg_ctl) on a free loopback port, for tests that must stop it.

Tests never depend on a database someone else runs: they create a cluster of their own in a
temporary folder, so they can stop it mid-stream and start it again. PostgreSQL refuses to run as
root, so when the tests run as root the cluster belongs to the ``postgres`` system user (created by
Debian's postgresql package).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from harness.broker import free_port


class PostgresUnavailable(RuntimeError):
    pass


def pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if versions:
        return versions[-1]
    raise PostgresUnavailable(f"{name} not found (Debian/Ubuntu: sudo apt-get install postgresql)")


class PostgresCluster:
    def __init__(self, workdir: Path, durable: bool = False) -> None:
        self.workdir = workdir
        self.durable = durable  # benchmarks want the real cost of a commit; tests want speed
        self.data = workdir / "pgdata"
        self.port = free_port()
        self.host = "127.0.0.1"
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root needs the 'postgres' system user") from None

    def _run(self, *args: str, timeout: float = 60) -> None:
        kwargs: dict = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)
        if done.returncode != 0:
            raise PostgresUnavailable(f"{Path(args[0]).name} failed: {done.stderr.strip() or done.stdout.strip()}")

    def init(self) -> PostgresCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(self.workdir, self._user.pw_uid, self._user.pw_gid)
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        return self

    def start(self) -> PostgresCluster:
        # fsync=off only skips flushing the OS cache, which a killed server process does not lose; commits
        # stay synchronous, so a test that stops the server with "immediate" keeps every committed row.
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses={self.host}"
        if not self.durable:
            options += " -c fsync=off"
        self._run(
            pg_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.workdir / "pg.log"), "-w", "start"
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def create_database(self, prefix: str = "bt") -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
