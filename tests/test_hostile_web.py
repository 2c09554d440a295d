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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from battery_trace.protocol import keys
from battery_trace.server.store import Store

from harness import collectors, waiting
from harness.broker import Broker, free_port
from harness.publisher import Publisher
from tests.event_examples import FIELDS, PACK
from tests.world import T0, Device

pytestmark = [pytest.mark.hostile, pytest.mark.integration]

TOKEN = "hostile-web-token-0123456789abcdefghij"
NOFILE = 256  # the server's descriptor limit in these tests, as LimitNOFILE sets it in production


def api(url: str, token: str | None = TOKEN, timeout: float = 10) -> tuple[int, bytes, Message]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


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


# -- 6. reads are bounded -----------------------------------------------------------------------------

HEALTH_EVENTS = 3000
LATE = 600  # maintenance reported months late: one late_report finding each
LAST_HEALTH = T0 + (HEALTH_EVENTS - 1) * 60_000


def fill(store: Store) -> None:
    """One battery with HEALTH_EVENTS health snapshots and LATE late maintenance reports, stored through
    the real verification and the real batch commit."""
    from battery_trace.server import verify
    from battery_trace.server.records import Accepted

    gw, rig = gateway(store), Device("rig-1", "maintenance", keys.generate())
    store.enroll("rig-1", "maintenance", rig.key.public, None, 0.0)
    now = time.time()
    sealed = [(gw, gw.seal("health", FIELDS["health"], T0 + i * 60_000)) for i in range(HEALTH_EVENTS)]
    repair = {**FIELDS["maintenance"], "health": {"soc_pct": 50}}
    sealed += [(rig, rig.seal("maintenance", repair, LAST_HEALTH + (i + 1) * 1000)) for i in range(LATE)]
    for start in range(0, len(sealed), 500):
        batch = []
        for device, raw in sealed[start : start + 500]:
            parsed = verify.parse(f"bt/v1/{device.name}/events", raw, 65536)
            outcome = verify.check(parsed, store.key(parsed.kid), now)
            assert isinstance(outcome, Accepted), outcome
            batch.append(outcome)
        store.commit(batch, [], now)


@pytest.fixture
def filled(tmp_path: Path, broker: Broker, store_url: str) -> Iterator[Server]:
    store = Store(store_url)
    fill(store)
    store.close()
    s = Server(tmp_path / "server", broker, store_url)
    yield s
    s.stop()


def pages(url: str, first: str) -> tuple[list[dict], list[int]]:
    """Every item of a list API, following its Link headers; and the size of each page."""
    items, sizes, path = [], [], first
    while path:
        code, body, headers = api(url + path)
        assert code == 200, body[:300]
        items += json.loads(body)
        sizes.append(len(body))
        link = headers.get("Link")
        path = link.split(">", 1)[0].removeprefix("<") if link else None
    return items, sizes


def test_every_list_comes_a_page_at_a_time(filled: Server) -> None:
    url = filled.url
    code, body, _ = api(f"{url}/api/batteries/{PACK}")
    battery = json.loads(body)
    assert code == 200 and len(body) < 300_000, f"{len(body)} bytes for one battery"
    assert len(battery["events"]) == 200 and battery["next"]
    assert battery["health_count"] == HEALTH_EVENTS + LATE and len(battery["health"]) <= 200
    first, last = battery["health"][0], battery["health"][-1]
    assert (first["time_ms"], last["time_ms"], last["soc_pct"]) == (T0, LAST_HEALTH + LATE * 1000, 50)
    seen, after = [], None
    while True:  # the lifecycle alone, a page after another: each event once, in time order
        query = "?lifecycle=1&limit=250" + (f"&after={after}" if after else "")
        page = json.loads(api(f"{url}/api/batteries/{PACK}{query}")[1])
        seen += page["events"]
        if not (after := page["next"]):
            break
    assert [e["type"] for e in seen] == ["maintenance"] * LATE
    assert len({(e["kid"], e["seq"]) for e in seen}) == LATE
    assert [e["time_ms"] for e in seen] == sorted(e["time_ms"] for e in seen)

    found, sizes = pages(url, "/api/findings?kind=late_report")
    assert len(found) == LATE and len({f["id"] for f in found}) == LATE and max(sizes) < 100_000
    assert [f["id"] for f in found] == sorted((f["id"] for f in found), reverse=True)  # newest first
    assert len(json.loads(api(f"{url}/api/findings")[1])) == 200  # what the dashboard shows, no more

    for bad, name in [
        (f"/api/batteries/{PACK}?limit=100000", "limit"),
        (f"/api/batteries/{PACK}?after=garbage", "after"),
        (f"/api/batteries/{PACK}?after=1.zz.3", "after"),
        ("/api/findings?before=inf", "before"),
        ("/api/findings?limit=0", "limit"),
        ("/api/rejects?before=-1", "before"),
        ("/api/devices?limit=1e9", "limit"),
    ]:
        code, body, _ = api(url + bad)
        assert code == 400 and json.loads(body)["parameter"] == name, (bad, code, body[:200])


def test_the_cli_pages_too(filled: Server) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        config = str(filled.workdir / "server.toml")
        return subprocess.run(
            [sys.executable, "-m", "battery_trace.server.cli", *args, "-c", config],
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = cli("findings", "--kind", "late_report", "--limit", "5", "--json")
    assert first.returncode == 0, first.stderr
    cursor = first.stderr.split("--before ", 1)[1].split()[0]
    second = cli("findings", "--kind", "late_report", "--limit", "5", "--before", cursor, "--json")
    ids = [f["id"] for f in json.loads(first.stdout)] + [f["id"] for f in json.loads(second.stdout)]
    assert len(set(ids)) == 10 and ids == sorted(ids, reverse=True)
    trace = cli("trace", PACK, "--limit", "3", "--json")
    assert len(json.loads(trace.stdout)["events"]) == 3 and "--after" in trace.stderr
    text = cli("trace", PACK)
    assert text.returncode == 0 and f"health: {HEALTH_EVENTS + LATE} readings" in text.stdout
    for bad in (("findings", "--before", "x"), ("trace", PACK, "--after", "1.2"), ("findings", "--limit", "5000")):
        done = cli(*bad)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


# -- 9. browser hygiene -------------------------------------------------------------------------------


def no_redirect(url: str, headers: dict[str, str]) -> tuple[int, Message]:
    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(Stay)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_the_browser_is_told_to_keep_the_token_and_the_pages_to_themselves(server: Server) -> None:
    behind_tls = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.0.0.9"}  # a TLS proxy on this host
    code, headers = no_redirect(f"{server.url}/?token={TOKEN}", behind_tls)
    assert code == 303 and TOKEN not in headers["Location"] and headers["Cache-Control"] == "no-store"
    cookie = headers["Set-Cookie"].lower()
    assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    code, headers = no_redirect(f"{server.url}/?token={TOKEN}", {})
    assert code == 303 and "secure" not in headers["Set-Cookie"].lower()  # plain HTTP: Secure would lose it
    for path, token in (("/", TOKEN), ("/api/overview", TOKEN), ("/api/overview", None), ("/healthz", None)):
        code, _, headers = api(server.url + path, token)
        assert headers["X-Frame-Options"] == "DENY" and headers["Referrer-Policy"] == "no-referrer", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Content-Type-Options"] == "nosniff", path
