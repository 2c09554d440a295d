"""A private mosquitto broker on a free loopback port, which its owner may kill and restart.

Tests and the demo never touch a shared broker: each starts its own with a generated config, so it
can kill it mid-stream (``kill()``) and bring it back on the same port with its persisted sessions
(``start()`` again).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class BrokerUnavailable(RuntimeError):
    pass


def mosquitto_binary() -> str:
    for candidate in (os.environ.get("BT_MOSQUITTO"), shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerUnavailable("mosquitto is not installed (Debian/Ubuntu: sudo apt-get install mosquitto)")


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
        self.config = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.config.write_text(
            (listener or "listener {port} 127.0.0.1\nallow_anonymous true\n").replace("{port}", str(self.port))
            + "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_queued_messages 100000\n"
            # Run as root, mosquitto drops to its own user, which cannot reach root's private temp folders
            # (this log, an ACL, TLS keys): stay root there.
             + ("user root\n" if os.geteuid() == 0 else "") + extra_config
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
