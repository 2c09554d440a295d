"""Agent footprint at a 16-slot swap station, and the outbox's seal rate (issue: under 60 MB RSS and
under 5 % of one core at 16 slots).

Footprint: a real `battery-agent run` process polls 16 emulated JBD BMSs on ptys at 1 Hz and seals a
health snapshot of each slot every second (16 events/s), delivered to a real collector through a
private mosquitto. After a warm-up, its resident memory and CPU time (from /proc) are sampled over
the measuring window; CPU per event = CPU seconds / events sealed in the window.

Seal rate: drafts sealed into an outbox on this disk (one SQLite transaction each, synchronous=FULL),
next to the limits measured in the same run: bare single-row commits with the same durability, and
Ed25519 signatures on one core.

    .venv/bin/python -m bench.agent_footprint [--slots 16] [--seconds 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import keys
from battery_trace.server.store import Store

from bench.machine import describe
from harness import agents, collectors
from harness.broker import Broker

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, resident memory in MB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return cpu, rss_kb / 1024


@contextlib.contextmanager
def recording(workdir: Path, broker: Broker) -> Iterator[tuple[Store, Path]]:
    """A SQLite record with a collector process (client id c1) storing into it; yields the store and
    the server key. Afterwards the collector is stopped and its broker session ended, so the broker
    stops handing it a share of what later runs publish."""
    store = Store(f"sqlite:{workdir / 'record.sqlite'}")
    server_key = workdir / "server.key"
    keys.save_private(keys.generate(), server_key)
    cfg = collectors.write_config(workdir / "collector.toml", store.url, broker, "c1", server_key)
    collector = collectors.start(cfg, workdir / "collector.log")
    try:
        collectors.wait_subscribed(workdir / "collector.log")
        yield store, server_key
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
        collectors.end_session(broker, "c1")
        store.close()


@contextlib.contextmanager
def station(
    workdir: Path, broker: Broker, store: Store, server_key: Path, slots: int
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A real agent polling ``slots`` emulated JBD BMSs on ptys at 1 Hz and sealing a health snapshot
    of each every second; yields the process and its status port."""
    device_key = keys.generate()
    keys.save_private(device_key, workdir / "station.key")
    store.enroll("bench-station", "swap_operator", device_key.public, None, 0)
    links, stubs = [], []
    body = ""
    for n in range(1, slots + 1):
        link = PtyLink(workdir / f"bms-{n}")
        stub = JbdBms(link, PackState(soc_pct=40 + n))
        stub.start()
        links.append(link)
        stubs.append(stub)
        body += (
            f'[[slots]]\nslot = {n}\ncode = "0RJPEA00HAU0AAG1C{3000100 + n:07d}"\n[slots.serial]\n'
            f'port = "{link.path}"\nprotocol = "jbd"\npoll_interval_s = 1.0\n'
        )
    config, port = agents.write_config(
        workdir / "agent.toml",
        "bench-station",
        workdir / "station.key",
        keys.load_private(server_key).public.hex,
        broker,
        "gateway",
        body,
        health_interval_s=1.0,
        resend_after_s=10.0,
    )
    agent = agents.start(config, workdir / "agent.log")
    try:
        yield agent, port
    finally:
        agents.stop(agent)
        for stub, link in zip(stubs, links, strict=True):
            stub.stop()
            link.close()


def footprint(workdir: Path, slots: int, seconds: float, warmup: float) -> dict[str, float]:
    with (
        Broker(workdir / "broker") as broker,
        recording(workdir, broker) as (store, server_key),
        station(workdir, broker, store, server_key, slots) as (agent, port),
    ):
        time.sleep(warmup)
        cpu0, _ = proc_sample(agent.pid)
        sealed0 = (agents.status(port) or {}).get("sealer", {}).get("sealed", 0)
        rss_max = 0.0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            time.sleep(1.0)
            rss_max = max(rss_max, proc_sample(agent.pid)[1])
        elapsed = time.monotonic() - start
        cpu1, rss = proc_sample(agent.pid)
        status = agents.status(port) or {}
        sealed = status.get("sealer", {}).get("sealed", 0) - sealed0
    cpu = cpu1 - cpu0
    return {
        "slots": slots,
        "seconds": round(elapsed, 1),
        "events_sealed": sealed,
        "events_per_s": round(sealed / elapsed, 2),
        "rss_mb": round(rss, 1),
        "rss_max_mb": round(rss_max, 1),
        "cpu_pct_of_one_core": round(100 * cpu / elapsed, 2),
        "cpu_ms_per_event": round(1000 * cpu / sealed, 3) if sealed else float("nan"),
        "backlog_at_end": status.get("outbox", {}).get("depth"),
    }


def seal_rate(workdir: Path, count: int) -> dict[str, float]:
    from battery_trace.agent.outbox import Outbox
    from battery_trace.agent.sealer import Draft, Sealer

    key = keys.generate()
    outbox = Outbox(workdir / "seal-outbox.sqlite")
    sealer = Sealer(outbox, key, "bench")
    health = {
        "voltage_v": 52.8,
        "current_a": -4.2,
        "soc_pct": 62.0,
        "cells_v": [3.301] * 16,
        "temps_c": [24.5, 25.1],
        "cycles": 117,
    }
    drafts = [
        Draft("health", "label", {"code": "0RJPEA00HAU0AAG1C3000123", "health": health, "slot": 1}, 1767225600000 + i)
        for i in range(count)
    ]
    start = time.perf_counter()
    for d in drafts:
        sealer.seal(d)
    seal = count / (time.perf_counter() - start)
    outbox.close()
    db = sqlite3.connect(workdir / "bare.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, envelope BLOB)")
    payload = os.urandom(700)
    start = time.perf_counter()
    for i in range(count):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (i, payload))
        db.execute("COMMIT")
    commit = count / (time.perf_counter() - start)
    message = os.urandom(700)
    start = time.perf_counter()
    for _ in range(count):
        key.sign(message)
    sign = count / (time.perf_counter() - start)
    return {"seal_per_s": round(seal), "bare_commit_per_s": round(commit), "sign_per_s": round(sign)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0, help="measuring window (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--seals", type=int, default=3000, help="drafts for the seal-rate run (default: %(default)s)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bt-agent-bench-"))
    print(f"machine: {describe()}")
    rates = seal_rate(workdir, args.seals)
    print(f"seal rate   {rates['seal_per_s']:>8,} events/s into the outbox (sign + encode + one FULL-sync commit each)")
    print(
        f"  limits    {rates['bare_commit_per_s']:>8,} bare single-row commits/s (same durability), "
        f"{rates['sign_per_s']:,} signatures/s"
    )
    print(
        f"footprint of a {args.slots}-slot station at 1 Hz, {args.seconds:.0f} s after {args.warmup:.0f} s warm-up..."
    )
    fp = footprint(workdir, args.slots, args.seconds, args.warmup)
    print(
        f"  sealed    {fp['events_sealed']} events ({fp['events_per_s']}/s), backlog at the end {fp['backlog_at_end']}"
    )
    print(f"  memory    {fp['rss_mb']} MB RSS (max {fp['rss_max_mb']} MB); goal < 60 MB")
    print(f"  CPU       {fp['cpu_pct_of_one_core']} % of one core, {fp['cpu_ms_per_event']} ms per event; goal < 5 %")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe(), "seal": rates, "footprint": fp}, indent=2))


if __name__ == "__main__":
    main()
