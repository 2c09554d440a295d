"""Agent processes for tests, benchmarks and the demo: real ``battery-agent run`` processes."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.broker import Broker, free_port


def jbd_slot(port: str | Path, code: str, poll_interval_s: float = 0.2) -> str:
    """An agent config's one slot: a JBD BMS on a serial port, its battery's code from the label."""
    return (
        f'[[slots]]\nslot = 1\ncode = "{code}"\n[slots.serial]\nport = "{port}"\npoll_interval_s = {poll_interval_s}\n'
    )


def write_config(
    path: Path,
    device: str,
    key: Path,
    server_public_hex: str,
    broker: Broker,
    site: str,
    body: str,
    *,
    role: str | None = None,
    health_interval_s: float = 1.0,
    resend_after_s: float = 2.0,
    extra_site: str = "",
) -> tuple[Path, int]:
    """An agent config with everything but the site's slots and devices (``body``); returns it and its
    loopback control port."""
    port = free_port()
    role_line = f'role = "{role}"\n' if role else ""
    path.write_text(
        f'[device]\nid = "{device}"\n{role_line}key = "{key}"\n'
        f'[server]\npublic_key = "{server_public_hex}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nresend_after_s = {resend_after_s}\n'
        f'[outbox]\npath = "{path.parent / (device + "-outbox.sqlite")}"\n'
        f'[site]\nkind = "{site}"\nhealth_interval_s = {health_interval_s}\nstatus_interval_s = 1\n{extra_site}'
        f'[observability]\nlisten = "127.0.0.1:{port}"\n' + body
    )
    return path, port


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "battery_trace.agent.cli", "run", "-c", str(config)], stdout=out, stderr=out
        )


def status(port: int) -> dict[str, Any] | None:
    """The running agent's /status, or None when it does not answer (callers poll again). A garbled
    answer counts as none: once, under a loaded CI run, the response began mid-body (BadStatusLine);
    it did not recur in isolation and is noted for follow-up rather than allowed to fail a poll."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            return json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return None


def slot(port: int, n: int = 1) -> dict[str, Any]:
    """Slot ``n`` in the running agent's /status ({} while the agent does not answer or the slot is unknown)."""
    return (status(port) or {}).get("slots", {}).get(str(n), {})


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, and SIGKILL if it has not stopped in time (so a failed test leaves no agent behind)."""
    import signal

    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def station_body(folder: Path, slots: Iterable[int]) -> str:
    """The [[slots]], [[scanners]] and [plc] of a swap station whose devices are the stubs' ptys in
    ``folder``: slcan adapters at can-slotN, label scanners at scanner-slotN, the PLC at plc."""
    numbers = list(slots)
    body = "".join(
        f'[[slots]]\nslot = {n}\n[slots.can]\ninterface = "slcan"\nchannel = "{folder / f"can-slot{n}"}"\n'
        f'bitrate = 250000\nprotocol = "gbt27930"\n[slots.can.options]\nsleep_after_open = 0\n'
        for n in numbers
    )
    body += "".join(f'[[scanners]]\nslot = {n}\nport = "{folder / f"scanner-slot{n}"}"\n' for n in numbers)
    return body + f'[plc]\nport = "{folder / "plc"}"\n'
