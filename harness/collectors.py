"""Collector processes for tests and benchmarks: real ``battery-server run`` processes, one config each."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from harness.broker import Broker


def write_config(
    path: Path,
    store_url: str,
    broker: Broker,
    client_id: str,
    key: Path,
    batch_ms: float = 20,
    batch_max: int = 500,
    receive_max: int = 2000,
    web_port: int | None = None,
) -> Path:
    path.write_text(
        f'[store]\nurl = "{store_url}"\n'
        f'[server]\nkey = "{key}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nclient_id = "{client_id}"\n'
        f"[intake]\nbatch_ms = {batch_ms}\nbatch_max = {batch_max}\nreceive_max = {receive_max}\n"
        f'[web]\nlisten = "{f"127.0.0.1:{web_port}" if web_port else "off"}"\n'
    )
    return path


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "battery_trace.server.cli", "run", "-c", str(config)], stdout=out, stderr=out
        )


def wait_subscribed(log: Path, timeout: float = 30, after: int = 0) -> None:
    """Until the collector logging to ``log`` has its subscription confirmed (the ``after``-th time + 1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("subscribed to") > after:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no confirmed subscription in {log} within {timeout} s")


def counters(log: Path) -> Counter[str]:
    """What a collector counted, from the 'stopped: {...}' line each run logs (summed over its runs)."""
    total: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        if "stopped: {" in line:
            total.update(ast.literal_eval(line.split("stopped: ", 1)[1]))
    return total


def end_session(broker: Broker, client_id: str) -> None:
    """Delete a collector's persistent session, so the broker stops giving it a share of the group."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(broker.host, broker.port, clean_start=True, properties=props)
    client.disconnect()
