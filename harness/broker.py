"""A private mosquitto broker on a free loopback port, which its owner may kill and restart.

Tests and the demo never touch a shared broker: each starts its own with a generated config, so it
can kill it mid-stream (``kill()``) and bring it back on the same port with its persisted sessions
(``start()`` again).

Started as root, mosquitto drops to its own unprivileged user before it opens any file, as in a
deployment, and the tests' broker does the same: what it reads and writes (persistence, log, the
PKI's broker/ folder) is handed to that user with ``reachable``, and nothing else is reachable.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BROKER_USER = "mosquitto"  # the user mosquitto drops to when started as root (its built-in default)


class BrokerUnavailable(RuntimeError):
    pass


def mosquitto_binary() -> str:
    for candidate in (os.environ.get("BT_MOSQUITTO"), shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerUnavailable("mosquitto is not installed (Debian/Ubuntu: sudo apt-get install mosquitto)")


def unprivileged_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(BROKER_USER)
    except KeyError:
        raise BrokerUnavailable(f"no user {BROKER_USER!r} to run mosquitto as (its package makes one)") from None


def reachable(folder: Path) -> Path:
    """FOLDER handed to the broker's user, as a deployment hands it its folder (``chown -R``); returns
    the path to give the broker. Run as root, a test's folders sit in pytest's private temp folder
    (0700, which the broker's user cannot even traverse): FOLDER then moves to a folder of its own
    in the system's temp folder and becomes a link to it, so tests keep using their own paths."""
    if os.geteuid() != 0:
        return folder  # mosquitto stays the user who started it
    user = unprivileged_user()
    if folder.is_symlink():
        real = folder.resolve()
    else:
        real = Path(tempfile.mkdtemp(prefix="bt-broker-"))
        atexit.register(shutil.rmtree, real, True)
        if folder.exists():
            for item in folder.iterdir():
                shutil.move(str(item), real / item.name)
            folder.rmdir()
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.symlink_to(real, target_is_directory=True)
    for path in [real, *real.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
    return real


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(
        self, workdir: Path, port: int | None = None, extra_config: str = "", listener: str | None = None
    ) -> None:
        """``listener`` replaces the plaintext, anonymous listener with another one (e.g. TLS and an ACL);
        it is given the port with ``{port}``."""
        self.workdir = workdir
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.binary = mosquitto_binary()
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        own = reachable(workdir)  # persistence and the log: the broker's own, as in a deployment
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.config.write_text(
            (listener or "listener {port} 127.0.0.1\nallow_anonymous true\n").replace("{port}", str(self.port))
            + "persistence true\n"
            f"persistence_location {own}/\n"
            "autosave_interval 1\n"
            f"log_dest file {own / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 100000\n"
            f"user {BROKER_USER}\n" + extra_config
        )

    def start(self, timeout: float = 10.0) -> Broker:
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise BrokerUnavailable(f"mosquitto exited with {self.process.returncode}: {err.strip()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise BrokerUnavailable(f"mosquitto did not listen on port {self.port} within {timeout} s")

    def kill(self) -> None:
        """Die like a power cut: no chance to save anything."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
