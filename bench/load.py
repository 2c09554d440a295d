"""Sustained load: 1,000 simulated devices publishing concurrently for a few minutes, and whether
the server's and a 16-slot agent's memory stay bounded.

Each simulated device is its own MQTT v5 connection with its own Ed25519 key, enrolled in the
registry; it seals a chained health event every --interval seconds (start times spread over the
interval) and verifies the receipts on its own receipts topic. Worker processes hold the devices
(--workers). Alongside, a real 16-slot agent polls emulated JBD BMSs at 1 Hz. Two collectors in one
shared-subscription group store into a private PostgreSQL cluster (durable), as in production.

Every 10 s a progress line shows what was published, stored and receipted, and the resident memory
of each collector, the broker and the agent. At the end: offered and stored rates, seal -> receipt
latency under load, and each process's memory after warm-up, at its peak and at the end, with its
growth over the second half of the run.

    .venv/bin/python -m bench.load [--devices 1000] [--interval 2] [--seconds 240] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import queue
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt
from battery_trace.protocol import envelope, events, keys, receipts, topics
from battery_trace.server.store import Store

from bench.agent_footprint import proc_sample, station
from bench.collector_rates import CELLS
from bench.machine import describe
from harness import agents, collectors
from harness.broker import Broker
from harness.postgres import PostgresCluster

WARMUP_S = 30.0


def health(i: int, n: int) -> dict:
    return {
        "code": f"0RJPEA00HAU0AAG1C{4000000 + i:07d}",
        "slot": 1,
        "health": {
            "voltage_v": 352.6,
            "soc_pct": 60 + n % 40,
            "cells_v": CELLS,
            "temps_c": [30.0, 29.5],
            "cycles": 417,
        },
    }


async def device(
    index: int,
    name: str,
    key: keys.PrivateKey,
    broker: tuple[str, int],
    server: keys.PublicKey,
    interval: float,
    until: float,
    stats: dict,
) -> None:
    prev, seq = events.ZERO_HASH, 0
    sent: dict[int, float] = {}
    watermark = 0
    async with aiomqtt.Client(
        broker[0], broker[1], identifier=f"sim-{name}", protocol=aiomqtt.ProtocolVersion.V5, timeout=60
    ) as client:
        await client.subscribe(topics.topic(name, "receipts"), qos=1)

        async def receive() -> None:
            nonlocal watermark
            async for message in client.messages:
                r = receipts.verify(bytes(message.payload), [server], name, {key.public.kid})
                now = time.time()
                for s in range(watermark + 1, r.watermark + 1):
                    stats["latency_ms"].append((now - sent.pop(s, now)) * 1000)
                stats["receipted"] += max(0, r.watermark - watermark)
                watermark = max(watermark, r.watermark)

        reader = asyncio.create_task(receive())
        await asyncio.sleep(random.random() * interval)  # spread the fleet over the interval
        while time.time() < until:
            seq += 1
            ev = events.Event(name, seq, prev, int(time.time() * 1000), "health", "label", health(index, seq))
            raw = envelope.sign(events.encode(ev), key)
            prev = envelope.envelope_hash(raw)
            sent[seq] = time.time()
            await client.publish(topics.topic(name, "events"), raw, qos=1)
            stats["published"] += 1
            await asyncio.sleep(interval)
        drain_until = time.time() + 120
        while watermark < seq and time.time() < drain_until:
            await asyncio.sleep(0.2)
        reader.cancel()


def worker(
    wid: int,
    fleet: list[tuple[int, str, bytes]],
    broker: tuple[str, int],
    server_hex: str,
    interval: float,
    until: float,
    out: mp.Queue,
) -> None:
    """One process holding a slice of the fleet; reports its counters every second."""
    server = keys.load_public(server_hex)
    stats: dict = {"published": 0, "receipted": 0, "latency_ms": []}

    async def run() -> None:
        async def report() -> None:
            while True:
                out.put(("progress", wid, stats["published"], stats["receipted"]))
                await asyncio.sleep(1.0)

        reporter = asyncio.create_task(report())
        await asyncio.gather(
            *(device(i, name, keys.PrivateKey(raw), broker, server, interval, until, stats) for i, name, raw in fleet)
        )
        reporter.cancel()

    asyncio.run(run())
    out.put(("done", stats["published"], stats["receipted"], stats["latency_ms"]))


def rss(pid: int) -> float:
    try:
        return proc_sample(pid)[1]
    except OSError:
        return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between a device's events (default 2)")
    p.add_argument("--seconds", type=float, default=240.0, help="how long the fleet publishes (default 240)")
    p.add_argument("--workers", type=int, default=4, help="processes holding the simulated devices")
    p.add_argument("--slots", type=int, default=16, help="slots of the real agent running alongside")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bt-load-"))
    print(f"machine: {describe()}")
    print(
        f"{args.devices} devices, one event each every {args.interval} s "
        f"(offered {args.devices / args.interval:,.0f} events/s) for {args.seconds:.0f} s, "
        f"plus a {args.slots}-slot agent at 1 Hz",
        flush=True,
    )
    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="bt-load-pg-")), durable=True).init().start()
    url = cluster.create_database()
    store = Store(url)
    fleet_keys = [(i, f"sim-{i:04d}", keys.generate()) for i in range(args.devices)]
    for _, name, key in fleet_keys:
        store.enroll(name, "gateway", key.public, "load", time.time() - 60)
    server_key = workdir / "server.key"
    keys.save_private(keys.generate(), server_key)
    server_public = keys.load_private(server_key).public
    samples: list[dict] = []
    with Broker(workdir / "broker") as broker:
        procs = []
        for n in (1, 2):
            cfg = collectors.write_config(workdir / f"c{n}.toml", url, broker, f"c{n}", server_key)
            procs.append(collectors.start(cfg, workdir / f"c{n}.log"))
            collectors.wait_subscribed(workdir / f"c{n}.log")
        with station(workdir, broker, store, server_key, args.slots) as (agent, agent_port):
            ctx = mp.get_context("spawn")  # workers must not inherit this process's threads and connections
            out: mp.Queue = ctx.Queue()
            begin = time.time()
            until = begin + args.seconds
            slices = [fleet_keys[w :: args.workers] for w in range(args.workers)]
            workers = [
                ctx.Process(
                    target=worker,
                    args=(
                        wid,
                        [(i, n, k.seed) for i, n, k in s],
                        (broker.host, broker.port),
                        server_public.hex,
                        args.interval,
                        until,
                        out,
                    ),
                )
                for wid, s in enumerate(slices)
            ]
            for w in workers:
                w.start()
            progress = {w: (0, 0) for w in range(args.workers)}
            done: list[tuple[int, int, list[float]]] = []
            watched = {"c1": procs[0].pid, "c2": procs[1].pid, "broker": broker.process.pid, "agent": agent.pid}
            next_sample = begin + 10
            while len(done) < args.workers:
                try:
                    msg = out.get(timeout=0.5)
                    if msg[0] == "done":
                        done.append(msg[1:])
                    else:
                        progress[msg[1]] = (msg[2], msg[3])
                except queue.Empty:
                    pass
                if time.time() >= next_sample:
                    next_sample += 10
                    published = sum(v[0] for v in progress.values())
                    sample = {
                        "t": round(time.time() - begin),
                        "published": published,
                        "stored": store.counts()["events"],
                        **{k: round(rss(pid), 1) for k, pid in watched.items()},
                    }
                    samples.append(sample)
                    print(
                        f"t={sample['t']:>4}s published {published:>8,} stored {sample['stored']:>8,}  RSS MB: "
                        + " ".join(f"{k} {sample[k]}" for k in watched),
                        flush=True,
                    )
            for w in workers:
                w.join()
            agent_status = agents.status(agent_port) or {}
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    stored = store.counts()["events"]
    store.close()
    cluster.stop()
    published = sum(d[0] for d in done)
    receipted = sum(d[1] for d in done)
    latency = [x for d in done for x in d[2]]
    q = statistics.quantiles(latency, n=100) if len(latency) > 100 else [float("nan")] * 99
    agent_sealed = agent_status.get("sealer", {}).get("sealed", 0)
    results = {
        "machine": describe(),
        "devices": args.devices,
        "seconds": args.seconds,
        "offered_per_s": args.devices / args.interval,
        "published": published,
        "receipted": receipted,
        "stored": stored,
        "agent_sealed": agent_sealed,
        "latency_ms": {"p50": q[49], "p99": q[98]},
        "memory_mb": _memory(samples, list(watched)),
        "samples": samples,
    }
    print(
        f"\npublished {published:,} events from {args.devices} devices ({published / args.seconds:,.0f}/s); "
        f"receipted {receipted:,}; stored {stored:,} (fleet + {agent_sealed} from the agent)"
    )
    print(f"seal -> receipt under load: p50 {q[49]:.0f} ms, p99 {q[98]:.0f} ms")
    for name, m in results["memory_mb"].items():
        print(
            f"memory {name:<7} after warm-up {m['warm']:>6} MB  peak {m['peak']:>6} MB  end {m['end']:>6} MB  "
            f"second-half growth {m['growth_second_half']:+.1f} MB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _memory(samples: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    warm = [s for s in samples if s["t"] >= WARMUP_S] or samples
    half = warm[len(warm) // 2 :]
    return {
        n: {
            "warm": warm[0][n],
            "peak": max(s[n] for s in warm),
            "end": warm[-1][n],
            "growth_second_half": round(half[-1][n] - half[0][n], 1),
        }
        for n in names
    }


if __name__ == "__main__":
    main()
