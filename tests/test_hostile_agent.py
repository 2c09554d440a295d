"""The agent against a hostile world: a disk that fills up under it, web pages in a browser on the rig
posting to its loopback endpoint, a corrupt or unusable outbox, and a broker reached in the clear.

Real `battery-agent` processes, real stubs on ptys, a real mosquitto and collector, and a really full
filesystem (a tiny tmpfs mounted for the test)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from battery_trace.agent.outbox import Outbox, OutboxError
from battery_trace.agent.sealer import Draft, Sealer
from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.can_slot import CanSlot
from battery_trace.firmware_stubs.daly_bms import DalyBms, DalyPack
from battery_trace.firmware_stubs.line_device import LineDevice
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import keys
from paho.mqtt import subscribe

from harness import agents
from harness.broker import free_port
from harness.waiting import wait_until
from tests.conftest import missing_service

pytestmark = pytest.mark.hostile
PACK_A, PACK_B = "0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124"
VIN = "LNBSCB3F1PW123456"
HEALTH = Draft("health", "label", {"code": PACK_A, "health": {"voltage_v": 52.8}, "slot": 1})


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *options: str) -> Iterator[Path]:
    """A filesystem of its own, ``size`` big, at ``where``; unmounted afterwards whatever happens."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        missing_service("a tmpfs mount (root)", mounted.stderr.strip())
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem holding ``folder``; returns the file that took them."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    assert os.statvfs(folder).f_bavail == 0
    return filler


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def retained_status(broker, device: str) -> dict:
    message = subscribe.simple(
        f"bt/v1/{device}/status", hostname=broker.host, port=broker.port, retained=True, msg_count=1
    )
    return json.loads(message.payload)


def test_a_full_outbox_disk_raises_disk_full_not_a_rollback_error(tmp_path):
    with tmpfs(tmp_path / "disk", "256k") as disk:
        outbox = Outbox(disk / "outbox.sqlite")
        try:
            sealer = Sealer(outbox, keys.generate(), "gw-1", "gateway")
            sealer.seal(HEALTH)
            fill(disk)
            appended = 0
            with pytest.raises(OutboxError, match="disk full") as caught:
                for _ in range(100):  # until what SQLite had already allocated is used up
                    outbox.append(sealer.kid, lambda seq, prev: (b"x" * 4000, b"h" * 32, "health"))
                    appended += 1
            assert "rollback" not in str(caught.value) and caught.value.full
            assert outbox.head(sealer.kid) == 1 + appended  # the failed one moved nothing
        finally:
            outbox.close()


@pytest.mark.integration
def test_a_swap_on_a_full_disk_is_held_alarmed_and_sealed_once_space_returns(tmp_path, record_server):
    """The outbox's filesystem fills up at a swap station; the swap finished meanwhile must not be lost,
    the station must say so everywhere it reports, and once space is freed the swap is sealed once, in
    order, with no gap in the device's chain; the agent never exits."""
    key = record_server.device("station-1", "swap_operator")
    slots = {n: CanSlot(tmp_path / f"can-slot{n}") for n in (1, 2)}
    scanners = {n: LineDevice(PtyLink(tmp_path / f"scanner-slot{n}")) for n in (1, 2)}
    plc = LineDevice(PtyLink(tmp_path / "plc"), ending=b"\n")
    body = agents.station_body(tmp_path, (1, 2))
    with tmpfs(tmp_path / "disk", "2m") as disk:
        config, port = agents.write_config(
            disk / "agent.toml",
            "station-1",
            key,
            record_server.public.hex,
            record_server.broker,
            "swap_station",
            body,
            role="swap_operator",
            extra_site="absent_after_s = 2\nidentity_wait_s = 60\n",
        )
        agent = agents.start(config, tmp_path / "agent.log")
        try:
            slots[1].insert(gbt27930_bms.Pack(serial=0xA1, soc_pct=80))
            wait_until(lambda: agents.slot(port).get("seen_at"), 20, "BMS A", [agent])
            scanners[1].send(PACK_A)
            wait_until(lambda: record_server.events("health"), 20, "a health snapshot of the stock", [agent])

            filler = fill(disk)
            # Health snapshots keep coming due; the first that cannot be written raises the alarm.
            wait_until(
                lambda: "disk full" in ((agents.status(port) or {"outbox": {}})["outbox"].get("alarm") or ""),
                30,
                "the alarm",
                [agent],
            )

            plc.send(f"VEHICLE {VIN}")
            plc.send("OUT 2")
            slots[2].insert(gbt27930_bms.Pack(serial=0xB2, soc_pct=12))
            scanners[2].send(PACK_B)
            plc.send("IN 1")
            slots[1].remove()
            plc.send("DONE")
            wait_until(lambda: agents.status(port)["outbox"]["held"] == 1, 30, "the swap to be held", [agent])
            code, why = get(port, "/healthz")
            assert code == 503 and "disk full" in why
            metrics = get(port, "/metrics")[1]
            assert "bt_agent_outbox_alarm 1" in metrics and "bt_agent_outbox_held 1" in metrics
            assert 'bt_agent_refused_total{reason="disk_full"}' in metrics  # health snapshots thinned
            assert "disk full" in retained_status(record_server.broker, "station-1")["alarm"]
            assert not record_server.events("swapped")

            filler.unlink()
            wait_until(lambda: record_server.events("swapped"), 30, "the held swap to be stored", [agent])
            wait_until(lambda: agents.status(port)["outbox"]["alarm"] is None, 10, "the alarm to clear", [agent])
            wait_until(lambda: len(record_server.events("health")) >= 3, 20, "snapshots again", [agent])
            status = agents.status(port)
            assert status["outbox"]["held"] == 0
            (swap,) = record_server.events("swapped")
            assert (swap.fields["vin"], swap.fields["code_out"], swap.fields["code_in"]) == (VIN, PACK_B, PACK_A)
            wait_until(lambda: agents.status(port)["outbox"]["depth"] == 0, 20, "every event receipted", [agent])
            seqs = sorted(e.seq for e in record_server.events())
            assert seqs == list(range(1, status["outbox"]["head_seq"] + 1))  # no gap, nothing twice
            assert agent.poll() is None
            assert "failed unexpectedly" not in (tmp_path / "agent.log").read_text()  # no source fell over either
            assert status["bindings"]["unsaved"] == 1  # battery B's binding, kept in memory while the disk was full
        finally:
            agents.stop(agent)
            for s in slots.values():
                s.close()
    assert agent.returncode == 0


def rig_agent(tmp_path: Path) -> tuple[Path, int, DalyBms, PtyLink]:
    link = PtyLink(tmp_path / "daly")
    bms = DalyBms(link, DalyPack(code=PACK_A, soc_pct=47.5, cells_mv=[3301, 3302, 3290, 3305]))
    bms.start()
    key = tmp_path / "rig.key"
    keys.save_private(keys.generate(), key)
    unreachable = type("B", (), {"host": "127.0.0.1", "port": free_port()})()
    body = f'[[slots]]\nslot = 1\n[slots.serial]\nport = "{link.path}"\nprotocol = "daly"\npoll_interval_s = 0.3\n'
    config, port = agents.write_config(
        tmp_path / "rig.toml",
        "rig-1",
        key,
        keys.generate().public.hex,
        unreachable,
        "maintenance_rig",
        body,
        role="maintenance",
        health_interval_s=600,
    )
    return config, port, bms, link


def post(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("POST", "/confirm", body=body, headers=headers)  # a Host given replaces the default
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@pytest.mark.integration
def test_a_web_page_on_the_rig_cannot_confirm_but_the_technician_can(tmp_path):
    config, port, bms, link = rig_agent(tmp_path)
    agent = agents.start(config, tmp_path / "agent.log")
    try:
        wait_until(
            lambda: agents.slot(port).get("code") == PACK_A,
            20,
            "the pack",
            [agent],
        )
        line = json.dumps({"line": "CONFIRM rebalance forged"}).encode()
        here = f"127.0.0.1:{port}"
        # What a form or fetch() on any web site in a browser on the rig sends without a CORS preflight.
        code, _ = post(port, line, {"Content-Type": "text/plain", "Origin": "https://evil.example"})
        assert code == 403
        assert "maintenance_sealed" not in agents.status(port)["workflow"]
        secret_file = tmp_path / "rig-1-outbox.control-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        secret = secret_file.read_text().strip()
        attacks = {
            "browser, with the secret": (
                {"Content-Type": "text/plain", "Origin": "https://evil.example", "Authorization": f"Bearer {secret}"},
                403,
            ),
            "no secret": ({"Content-Type": "application/json"}, 401),
            "wrong secret": ({"Content-Type": "application/json", "Authorization": "Bearer nope"}, 401),
            "foreign origin": (
                {"Content-Type": "application/json", "Authorization": f"Bearer {secret}", "Origin": "https://e.x"},
                403,
            ),
            "not json": ({"Content-Type": "text/plain", "Authorization": f"Bearer {secret}"}, 415),
            # DNS rebinding: a page whose own name resolves to 127.0.0.1.
            "rebound host": (
                {
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {secret}",
                    "Host": f"evil.example:{port}",
                },
                421,
            ),
        }
        for name, (headers, expected) in attacks.items():
            code, text = post(port, line, headers)
            assert code == expected, (name, code, text)
            assert secret not in text
        status = agents.status(port)
        assert "maintenance_sealed" not in status["workflow"]
        metrics = get(port, "/metrics")[1]
        assert 'bt_agent_control_refused_total{reason="origin"} 3' in metrics
        assert secret not in (tmp_path / "agent.log").read_text()

        done = subprocess.run(
            [sys.executable, "-m", "battery_trace.agent.cli", "confirm", "rebalance", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert agents.status(port)["workflow"]["maintenance_sealed"] == 1
        code, _ = post(
            port, line, {"Content-Type": "application/json", "Authorization": f"Bearer {secret}", "Host": here}
        )
        assert code == 200  # the endpoint itself, with everything right
        assert (
            get(port, "/healthz") == (503, "broker not connected\n") and get(port, "/status")[0] == 200
        )  # reads stay open
    finally:
        agents.stop(agent)
        bms.stop()
        link.close()


@pytest.mark.integration
def test_a_confirmation_on_a_full_disk_is_accepted_held_and_sealed_once_space_returns(tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        config, port, bms, link = rig_agent(disk)
        agent = agents.start(config, tmp_path / "agent.log")
        try:
            wait_until(
                lambda: agents.slot(port).get("code") == PACK_A,
                20,
                "the pack",
                [agent],
            )
            filler = fill(disk)
            held = _cli(config, ["confirm", "rebalance"])
            assert held.returncode == 0 and "NOT SEALED YET" in held.stderr and "do not confirm" in held.stderr
            status = agents.status(port)
            assert status["workflow"]["maintenance_held"] == 1 and status["outbox"]["held"] == 1
            assert status["outbox"]["head_seq"] == 0
            filler.unlink()
            wait_until(lambda: agents.status(port)["outbox"]["held"] == 0, 10, "the confirmation sealed", [agent])
            assert agents.status(port)["outbox"]["head_seq"] == 1 and agents.status(port)["outbox"]["alarm"] is None
        finally:
            agents.stop(agent)
            bms.stop()
            link.close()
    assert agent.returncode == 0


def _corrupt(folder: Path) -> Path:
    path = folder / "outbox.sqlite"
    path.write_bytes(os.urandom(8192))
    return path


def _truncated(folder: Path) -> Path:
    path = folder / "outbox.sqlite"
    outbox = Outbox(path)
    sealer = Sealer(outbox, keys.generate(), "gw-1", "gateway")
    for _ in range(300):
        sealer.seal(HEALTH)
    outbox.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 3)
    return path


def _under_a_file(folder: Path) -> Path:
    (folder / "not-a-folder").write_text("")
    return folder / "not-a-folder" / "outbox.sqlite"


OUTBOXES = {"random bytes": _corrupt, "truncated": _truncated, "folder is a file": _under_a_file}
COMMANDS = {
    "run": ["run"],
    "status": ["status"],
    "emit": [
        "emit",
        "produced",
        "--field",
        f"code={PACK_A}",
        "--field",
        "chemistry=ncm",
        "--field",
        "rated_capacity_ah=150",
        "--field",
        "rated_energy_kwh=52.5",
        "--no-wait",
    ],
    "confirm": ["confirm", "rebalance"],
}


def _config_with_outbox(tmp_path: Path, outbox: Path, site: str = "maintenance_rig") -> Path:
    key = tmp_path / "dev.key"
    keys.save_private(keys.generate(), key)
    unreachable = type("B", (), {"host": "127.0.0.1", "port": free_port()})()
    config, _ = agents.write_config(
        tmp_path / "agent.toml", "rig-1", key, keys.generate().public.hex, unreachable, site, "", role=None
    )
    text = config.read_text()
    config.write_text(text.replace(f'path = "{tmp_path / "rig-1-outbox.sqlite"}"', f'path = "{outbox}"'))
    return config


def _cli(config: Path, command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "battery_trace.agent.cli", *command, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _one_clear_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("outbox", list(OUTBOXES))
def test_a_corrupt_or_unusable_outbox_is_one_clear_line_and_exit_2(tmp_path, outbox):
    path = OUTBOXES[outbox](tmp_path)
    config = _config_with_outbox(tmp_path, path)
    for name, command in COMMANDS.items():
        result = _cli(config, command)
        _one_clear_line(result, *(("outbox", str(path)) if name != "confirm" else ("secret",)))


def test_an_outbox_on_a_read_only_filesystem_is_one_clear_line_and_exit_2(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", "ro") as folder:
        config = _config_with_outbox(tmp_path, folder / "outbox.sqlite")
        for name in ("run", "emit"):
            _one_clear_line(_cli(config, COMMANDS[name]), "outbox", str(folder / "outbox.sqlite"))


def test_a_remote_broker_in_the_clear_is_refused_unless_allowed_and_then_warned_about(tmp_path):
    config = _config_with_outbox(tmp_path, tmp_path / "outbox.sqlite", site="gateway")
    text = config.read_text().replace('host = "127.0.0.1"', 'host = "192.0.2.10"')  # TEST-NET: not this machine
    config.write_text(text)
    for name in ("run", "emit", "status"):
        _one_clear_line(_cli(config, COMMANDS[name] if name != "emit" else ["emit", "--no-wait"]), "allow_plaintext")
    config.write_text(text.replace("[mqtt]\n", "[mqtt]\nallow_plaintext = true\n"))
    log = tmp_path / "agent.log"
    agent = agents.start(config, log)
    try:
        wait_until(
            lambda: "WARNING" in log.read_text() and "IN THE CLEAR" in log.read_text(), 20, "the warning", [agent]
        )
    finally:
        agents.stop(agent)
    assert agent.returncode == 0


def test_the_offline_status_of_a_healthy_outbox_still_works(tmp_path):
    """The guard against corrupt outboxes must not turn a good one away."""
    path = tmp_path / "good" / "outbox.sqlite"
    outbox = Outbox(path)
    Sealer(outbox, keys.generate(), "gw-1", "gateway").seal(HEALTH)
    outbox.close()
    result = _cli(_config_with_outbox(tmp_path, path), ["status", "--json"])
    assert result.returncode == 1 and json.loads(result.stdout)["outbox"]["depth"] == 1
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM outbox").fetchone() == (1,)
