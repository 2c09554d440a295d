"""A hostile world, second front: the dashboard and its API under people who do not mean well.

Each runs on the real parts: a real ``battery-server run`` process (collector and dashboard) on a
private mosquitto, real HTTP clients on real sockets, the record on SQLite and PostgreSQL where the
record is read.
"""

from __future__ import annotations

import collections
import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from battery_trace.protocol import keys
from battery_trace.server.store import Store

from harness import collectors, waiting
from harness.broker import Broker, free_port
from harness.publisher import Publisher
from tests.event_examples import FIELDS
from tests.world import T0, Device

pytestmark = [pytest.mark.hostile, pytest.mark.integration]

TOKEN = "hostile-web-token-0123456789abcdefghij"
NOFILE = 256  # the server's descriptor limit in these tests, as LimitNOFILE sets it in production


def api(url: str, token: str | None = TOKEN, timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


class Server:
    """A real ``battery-server run`` with its dashboard, its descriptors limited to ``NOFILE``."""

    def __init__(self, workdir: Path, broker: Broker, store_url: str, extra_web: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.broker = workdir, broker
        self.store = Store(store_url)
        key_path = workdir / "server.key"
        keys.save_private(keys.generate(), key_path)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = collectors.write_config(workdir / "server.toml", store_url, broker, "c1", key_path, web_port=self.port)
        (workdir / "web.token").write_text(TOKEN + "\n")
        config.write_text(config.read_text() + f'token_file = "{workdir / "web.token"}"\n' + extra_web)
        self.log = workdir / "server.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "battery_trace.server.cli", "run", "-c", str(config)],
                stdout=out,
                stderr=out,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)),
            )
        collectors.wait_subscribed(self.log)
        waiting.wait_until(self.answers, 20, "the dashboard", [self.proc])

    def answers(self) -> bool:
        try:
            return api(f"{self.url}/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.store.close()


@pytest.fixture
def server(tmp_path: Path, broker: Broker) -> Iterator[Server]:
    s = Server(tmp_path / "server", broker, f"sqlite:{tmp_path / 'record.sqlite'}")
    yield s
    s.stop()


def gateway(store: Store) -> Device:
    device = Device("gw-1", "gateway", keys.generate())
    store.enroll("gw-1", "gateway", device.key.public, None, 0.0)
    return device


def publish_health(broker: Broker, device: Device, n: int) -> None:
    publisher = Publisher(broker, f"pub-{device.seq}")
    try:
        items = [
            (f"bt/v1/{device.name}/events", device.seal("health", FIELDS["health"], T0 + device.seq * 1000))
            for _ in range(n)
        ]
        publisher.publish(items)
    finally:
        publisher.close()


def stored(store: Store) -> int:
    return store.counts()["events"]


# -- 5. the dashboard cannot starve the collector -----------------------------------------------------


def slowloris(port: int, n: int) -> list[socket.socket]:
    """``n`` unauthenticated connections, each holding a request whose headers never end."""
    held = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
            s.sendall(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nX-a: ")
            held.append(s)
        except OSError:  # refused or timed out: the server is defending itself; go on trying
            pass
    return held


def dribble(held: list[socket.socket]) -> None:
    """One more header byte on every held connection, as a slowloris does to defeat idle timeouts."""
    for s in held:
        with contextlib.suppress(OSError):
            s.sendall(b"b")


def test_partial_headers_cannot_starve_the_collector(server: Server, broker: Broker) -> None:
    device = gateway(server.store)
    publish_health(broker, device, 20)
    waiting.wait_until(lambda: stored(server.store) == 20, 30, "the first events", [server.proc])
    held = slowloris(server.port, 2 * NOFILE)
    try:
        dribble(held)
        publish_health(broker, device, 20)
        waiting.wait_until(lambda: stored(server.store) == 40, 30, "events during the attack", [server.proc])
        broker.stop()  # the collector must reconnect while the attack goes on
        broker.start()
        dribble(held)
        held += slowloris(server.port, NOFILE)
        publish_health(broker, device, 20)
        waiting.wait_until(lambda: stored(server.store) == 60, 60, "events after a broker restart", [server.proc])
        dribble(held)
    finally:
        for s in held:
            s.close()
    # The attack is over: the dashboard answers again, without a restart.
    waiting.wait_until(server.answers, 30, "the dashboard after the attack", [server.proc])
    code, body, _ = api(f"{server.url}/api/overview")
    assert code == 200 and json.loads(body)["totals"]["events"] == 60
    lines = server.log.read_text(errors="replace").splitlines()
    assert server.log.stat().st_size < 200_000, f"the log grew to {server.log.stat().st_size} bytes"
    repeated = collections.Counter(line.split(" ", 2)[-1] for line in lines).most_common(1)
    assert not repeated or repeated[0][1] <= 20, f"a line repeated {repeated[0][1]} times: {repeated[0][0]}"
    assert server.proc.poll() is None
    assert not [line for line in lines if "Too many open files" in line], "the limits did not hold"
