"""Careless operators: every time, number and secret a person gives the server is checked before
anything is written, a wrong revocation can be corrected (but one in effect is never lifted silently),
the dashboard is never open by accident, and no signing key or record is conjured or misread silently.

Everything here runs the real ``battery-server`` as a process, against the real record (both backends
where the record is touched).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from battery_trace.protocol import keys
from battery_trace.server.store import Store

from harness import collectors
from harness.broker import free_port
from tests.conftest import private_cluster
from tests.world import DAY, T0, World

pytestmark = [pytest.mark.hostile, pytest.mark.integration]

PACK = "0RJPEA00HAU0AAG1C3000123"
TOKEN = "t" * 40
NOW = time.time()


def server(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "battery_trace.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def write_config(path: Path, store_url: str, extra: str = "", web: str = "off", broker_port: int = 1) -> Path:
    """A server config whose key and token live next to it."""
    path.write_text(
        f'[store]\nurl = "{store_url}"\n{extra}'
        f'[server]\nkey = "{path.parent / "server.key"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\n'
        f'[web]\nlisten = "{web}"\ntoken_file = "{path.parent / "web.token"}"\n'
    )
    return path


def one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, no traceback, one line on stderr that says the fragments."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def enrolled(tmp_path, store_url):
    """A config on the store under test with station-1 and station-2 enrolled."""
    config = write_config(tmp_path / "server.toml", store_url)
    for name in ("station-1", "station-2"):
        key = keys.generate().public.hex
        done = server("devices", "enroll", name, "--role", "swap_operator", "--key", key, "-c", str(config))
        assert done.returncode == 0, done.stderr
    return config


def key_state(config: Path, device: str) -> tuple[str, float | None]:
    listed = server("devices", "list", "--json", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    (row,) = [r for r in json.loads(listed.stdout) if r["device"] == device]
    return row["key_state"], row["revoked_at"]


# -- item 3: times and numbers a person types --------------------------------------------------------------


def test_a_revocation_time_that_is_no_plausible_time_is_refused_before_anything_is_written(enrolled):
    for given, says in [
        ("1764600000000", "milliseconds"),  # the easy slip: year 57887, a revocation that never takes effect
        ("nan", "not a finite"),
        ("1e400", "not a finite"),
        ("-inf", "not a finite"),
        ("-5", "2000-01-01"),
        ("2026-11-01T08:00:00", "zone"),  # local time or UTC? an 8 h slip in a revocation matters
        ("next tuesday", "ISO 8601"),
    ]:
        done = server("devices", "revoke", "station-1", f"--at={given}", "-c", str(enrolled))
        one_line_error(done, "--at", given, says)
        assert key_state(enrolled, "station-1") == ("active", None), given


def test_every_time_and_number_flag_of_the_query_commands_is_checked(enrolled):
    for args, says in [
        (("export", "--since", "nan", "--until", "2026-01-02"), "--since"),
        (("export", "--since", "2026-01-01", "--until", "1764600000000"), "milliseconds"),
        (("rejects", "--since", "inf"), "--since"),
        (("rejects", "--limit", "-1"), "--limit"),  # SQLite reads LIMIT -1 as "no limit"
        (("rejects", "--limit", "0"), "--limit"),
        (("rejects", "--limit", "1e9"), "--limit"),
    ]:
        one_line_error(server(*args, "-c", str(enrolled)), says)
    ok = server("rejects", "--since", "2026-01-01T08:00:00+08:00", "--limit", "5", "-c", str(enrolled))
    assert ok.returncode == 0, ok.stderr


def test_a_revocation_in_milliseconds_can_be_moved_to_the_intended_time(enrolled):
    """The slip as it happens today: already recorded, it must be correctable (revocation moved earlier)."""
    store = Store(_url(enrolled))
    try:
        store.revoke("station-1", 1_764_600_000_000)  # what the old CLI wrote for --at 1764600000000
    finally:
        store.close()
    shown = server("devices", "list", "-c", str(enrolled))
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    fixed = server("devices", "revoke", "station-1", "--at", "1764600000", "-c", str(enrolled))
    assert fixed.returncode == 0, fixed.stderr
    assert "moved" in fixed.stdout and "2025-12-01 14:40:00" in fixed.stdout, fixed.stdout
    assert key_state(enrolled, "station-1") == ("revoked", 1_764_600_000.0)


def test_a_scheduled_revocation_can_be_moved_earlier_or_lifted_but_not_moved_later(enrolled):
    later, sooner = NOW + 30 * 86400, NOW + 86400
    assert server("devices", "revoke", "station-1", "--at", f"{later:.0f}", "-c", str(enrolled)).returncode == 0
    moved = server("devices", "revoke", "station-1", "--at", f"{sooner:.0f}", "-c", str(enrolled))
    assert moved.returncode == 0 and "moved" in moved.stdout, moved.stdout + moved.stderr
    assert key_state(enrolled, "station-1") == ("revoked", float(f"{sooner:.0f}"))
    not_later = server("devices", "revoke", "station-1", "--at", f"{later:.0f}", "-c", str(enrolled))
    assert not_later.returncode == 1 and "already revoked" in not_later.stderr, not_later.stderr
    lifted = server("devices", "unrevoke", "station-1", "-c", str(enrolled))
    assert lifted.returncode == 0 and "lifted" in lifted.stdout, lifted.stdout + lifted.stderr
    assert key_state(enrolled, "station-1") == ("active", None)
    assert key_state(enrolled, "station-2") == ("active", None)
    nothing = server("devices", "unrevoke", "station-2", "-c", str(enrolled))
    assert nothing.returncode == 1 and "not revoked" in nothing.stderr, nothing.stderr


def test_a_revocation_in_effect_is_lifted_only_when_asked_and_says_what_it_undoes(enrolled):
    store = Store(_url(enrolled))
    world = World(store)
    try:
        station = world.device("station-9", "swap_operator")
        now_ms = int(NOW * 1000)
        world.send(station, "health", {"code": PACK, "health": {"soc_pct": 50}}, now_ms - 2 * DAY, delay_ms=0)
        store.revoke("station-9", NOW - DAY)  # in effect since yesterday
        raw = station.seal("health", {"code": PACK, "health": {"soc_pct": 40}}, now_ms - 1000)
        world.deliver(station, raw, now_ms)  # refused: quarantined under the revocation
        assert store.counts()["rejected"] == {"key_revoked": 1}
    finally:
        store.close()
    refused = server("devices", "unrevoke", "station-9", "-c", str(enrolled))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "in effect" in refused.stderr and "1 message" in refused.stderr and "--in-effect" in refused.stderr
    assert key_state(enrolled, "station-9")[0] == "revoked"
    lifted = server("devices", "unrevoke", "station-9", "--in-effect", "-c", str(enrolled))
    assert lifted.returncode == 0, lifted.stderr
    assert "1 message" in lifted.stdout and "stay in quarantine" in lifted.stdout, lifted.stdout
    assert key_state(enrolled, "station-9") == ("active", None)


# -- item 3: the API's query parameters ----------------------------------------------------------------------


@pytest.fixture
def dashboard(tmp_path, broker):
    """A real ``battery-server run`` with its web on a free port and its token in its token file."""
    port = free_port()
    config = write_config(
        tmp_path / "server.toml",
        f"sqlite:{tmp_path / 'record.sqlite'}",
        web=f"127.0.0.1:{port}",
        broker_port=broker.port,
    )
    keys.save_private(keys.generate(), tmp_path / "server.key")
    (tmp_path / "web.token").write_text(TOKEN + "\n")
    log = tmp_path / "server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "battery_trace.server.cli", "run", "-c", str(config)], stdout=out, stderr=out
        )
    try:
        collectors.wait_subscribed(log)
        wait_listening(port)
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


def wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (503 while it is not yet subscribed)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def get(url: str, token: str = TOKEN) -> tuple[int, object]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode(errors="replace")  # e.g. a 500's plain text


def test_a_bad_api_parameter_is_a_400_that_names_it_never_a_500_or_a_silent_default(dashboard):
    base, _ = dashboard
    for query, name in [
        ("/api/overview?window_s=nan", "window_s"),
        ("/api/overview?window_s=inf", "window_s"),
        ("/api/overview?window_s=10", "window_s"),  # below its range: refused, not clamped
        ("/api/overview?bucket_s=1e400", "bucket_s"),
        ("/api/overview?bucket_s=ten", "bucket_s"),
        ("/api/rejects?limit=0", "limit"),
        ("/api/rejects?limit=2.5", "limit"),
        ("/api/rejects?limit=nan", "limit"),
        ("/api/findings?open=maybe", "open"),
        ("/api/findings?kind=nonsense", "kind"),
        ("/api/findings?knd=late_report", "knd"),  # a misspelt filter must not quietly return everything
    ]:
        status, body = get(base + query)
        assert status == 400, (query, status, body)
        assert isinstance(body, dict) and body.get("parameter") == name and name in body["error"], (query, body)
    assert get(base + "/api/overview?window_s=600&bucket_s=60")[0] == 200
    assert get(base + "/api/findings?open=0&kind=late_report")[0] == 200
    assert get(base + "/api/rejects?limit=5")[0] == 200


# -- item 8: secrets -----------------------------------------------------------------------------------------


def test_the_server_refuses_to_start_with_an_empty_or_short_token(tmp_path, broker):
    config = write_config(
        tmp_path / "server.toml",
        f"sqlite:{tmp_path / 'record.sqlite'}",
        web=f"127.0.0.1:{free_port()}",
        broker_port=broker.port,
    )
    keys.save_private(keys.generate(), tmp_path / "server.key")
    token_file = tmp_path / "web.token"
    for content, env in [("", {}), ("\n", {}), ("short-token\n", {}), (TOKEN, {"BT_WEB_TOKEN": ""})]:
        token_file.write_text(content)  # a `touch`, a crash between create and write, a hand-made token
        try:
            done = server("run", "-c", str(config), env=env, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server started with the token {content!r} (env {env})")
        one_line_error(done, "token")
        assert TOKEN not in done.stderr


def test_no_secret_reaches_the_log_and_the_store_password_may_come_from_a_file_or_the_environment(tmp_path, broker):
    secret = "pw-Zq8-not-for-logs"
    with private_cluster("bt-pgpw-") as cluster:
        import psycopg

        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE operator_pw LOGIN PASSWORD '{secret}'")
            conn.execute("CREATE DATABASE record_pw OWNER operator_pw")
            hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
            hba.write_text(f"host all operator_pw {cluster.host}/32 scram-sha-256\n" + hba.read_text())
            conn.execute("SELECT pg_reload_conf()")
        bare = f"postgresql://operator_pw@{cluster.host}:{cluster.port}/record_pw"
        with_password = f"postgresql://operator_pw:{secret}@{cluster.host}:{cluster.port}/record_pw"

        no_password = server("devices", "list", "-c", str(write_config(tmp_path / "a.toml", bare)))
        assert no_password.returncode == 1 and "password" in no_password.stderr, no_password.stderr  # scram is on

        (tmp_path / "db.password").write_text(secret + "\n")
        from_file = write_config(tmp_path / "b.toml", bare, extra=f'password_file = "{tmp_path / "db.password"}"\n')
        listed = server("devices", "list", "-c", str(from_file))
        assert listed.returncode == 0, listed.stderr

        wrong = server("devices", "list", env={"BT_STORE_URL": with_password.replace(secret, secret + "x")})
        assert wrong.returncode == 1 and secret not in wrong.stderr, wrong.stderr

        port = free_port()
        config = write_config(tmp_path / "c.toml", bare, web=f"127.0.0.1:{port}", broker_port=broker.port)
        keys.save_private(keys.generate(), tmp_path / "server.key")
        log = tmp_path / "server.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "battery_trace.server.cli", "--log-level", "DEBUG", "run", "-c", str(config)],
                stdout=out,
                stderr=out,
                env={**os.environ, "BT_STORE_URL": with_password, "BT_WEB_TOKEN": TOKEN},
            )
        try:
            collectors.wait_subscribed(log)
            wait_listening(port)
            assert get(f"http://127.0.0.1:{port}/api/devices")[0] == 200  # the token from the environment
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
        text = log.read_text()
        assert "operator_pw" in text and "record_pw" in text, text  # the store is named, redacted
        assert secret not in text and TOKEN not in text, text
        assert not (tmp_path / "web.token").exists()  # the environment's token is not copied to a file


# -- item 13: no key conjured, no record misread ---------------------------------------------------------------


def test_a_missing_server_key_is_refused_and_created_only_by_init(tmp_path):
    config = write_config(tmp_path / "server.toml", f"sqlite:{tmp_path / 'record.sqlite'}", web="127.0.0.1:1")
    key = tmp_path / "server.key"
    for command in (("pubkey",), ("run",)):
        done = server(*command, "-c", str(config), timeout=20)
        one_line_error(done, str(key), "battery-server init")
        assert not key.exists(), command
    created = server("init", "-c", str(config))
    assert created.returncode == 0, created.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    token = tmp_path / "web.token"
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text().strip()) >= 32
    assert token.read_text().strip() not in created.stdout + created.stderr
    first = key.read_bytes(), token.read_bytes()
    again = server("init", "-c", str(config))
    assert again.returncode == 0 and (key.read_bytes(), token.read_bytes()) == first  # never overwritten
    public = server("pubkey", "-c", str(config))
    assert public.returncode == 0 and public.stdout.strip() == keys.load_private(key).public.hex
    shown = server("init", "--help")
    assert shown.returncode == 0 and "example" in shown.stdout


def _url(config: Path) -> str:
    return config.read_text().split('url = "', 1)[1].split('"', 1)[0]


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_corrupt_record_is_one_line_and_exit_2_for_run_and_every_query(tmp_path, damage):
    record = tmp_path / "record.sqlite"
    if damage == "random bytes":
        record.write_bytes(os.urandom(64 * 1024))
    else:
        store = Store(f"sqlite:{record}")
        world = World(store)
        station = world.device("station-1", "swap_operator")
        for i in range(300):
            world.send(station, "health", {"code": PACK, "health": {"soc_pct": i % 100}}, T0 + i)
        store.close()
        with sqlite3.connect(record) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(record, "r+b") as f:
            f.truncate(record.stat().st_size // 2)
    config = write_config(tmp_path / "server.toml", f"sqlite:{record}")
    keys.save_private(keys.generate(), tmp_path / "server.key")
    for args in [
        ("run",),
        ("trace", PACK),
        ("vehicle", "LNBSCB3F1PW123456"),
        ("device", "station-1"),
        ("audit", "station-1"),
        ("findings",),
        ("rejects",),
        ("export", "--since", "2026-01-01", "--until", "2100-01-01"),
        ("devices", "list"),
    ]:
        done = server(*args, "-c", str(config), timeout=20)
        one_line_error(done, str(record))


def test_lifting_a_scheduled_revocation_after_a_rotation_leaves_the_old_key_retired(enrolled):
    """Not two active keys: the rotation ended the old key even though its revocation was only scheduled."""
    soon = f"{NOW + 86400:.0f}"
    assert server("devices", "revoke", "station-1", "--at", soon, "-c", str(enrolled)).returncode == 0
    new = keys.generate().public.hex
    assert server("devices", "rotate", "station-1", "--key", new, "-c", str(enrolled)).returncode == 0
    assert server("devices", "unrevoke", "station-1", "-c", str(enrolled)).returncode == 0
    listed = json.loads(server("devices", "list", "--json", "-c", str(enrolled)).stdout)
    rows = [
        (r["public_key"] == new, r["key_state"], r["valid_until"] is None) for r in listed if r["device"] == "station-1"
    ]
    assert sorted(rows) == [(False, "retired", False), (True, "active", True)]
