"""Collector throughput and latency, next to the limits measured in the same run (DESIGN.md §10).

For each backend (SQLite; PostgreSQL at --pg-url, else a private cluster with default durability):
  - one collector process, then two in one shared-subscription group, draining the same pre-queued
    events (the broker holds them for the collectors' persistent sessions, so the rate is the
    collectors' own), measured in steady state: between 20 % and 95 % of the events stored;
  - seal -> receipt latency (p50/p99) at a steady rate of half the one-collector throughput, with one
    collector and with two; a receipt is sent right after the commit, so this bounds seal -> commit
    from above.
Limits, measured again for each backend right before its collectors run: receive (broker -> one
plain subscriber), verify (Ed25519 per second, one thread: the collector's batch call, PyNaCl per call,
cryptography), insert (event rows per second, batched, as the store inserts them); composed limit =
1 / (1/receive + 1/verify + 1/insert) with the verify rate of the collector's own call. Next to them the collector's own
stages alone on one thread (check: everything server/verify.py does per event; commit: the store's
batch commit and the receipts) and the serial ceiling they make with receive, which shows how much of
a collector's time goes to work the composed limit does not count, and how much its threads overlap.

    .venv/bin/python -m bench.collector_rates [--events 20000] [--devices 20] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from battery_trace.protocol import envelope, events, keys, receipts
from battery_trace.server.store import Store

from bench import limits
from bench.machine import describe
from harness import collectors
from harness.broker import Broker
from harness.postgres import PostgresCluster
from harness.publisher import Publisher

CELLS = [3.301 + (i % 7) / 1000 for i in range(24)]


def seal_fleet(
    devices: list[tuple[str, keys.PrivateKey]], per_device: int, times: list[int]
) -> list[tuple[str, bytes]]:
    """Interleaved health events of every device, sealed and chained as agents would."""
    prev = {name: events.ZERO_HASH for name, _ in devices}
    out = []
    for n in range(per_device):
        for i, (name, key) in enumerate(devices):
            fields = {
                "code": f"0RJPEA00HAU0AAG1C{3000000 + i:07d}",
                "slot": i % 16,
                "health": {
                    "voltage_v": 352.6,
                    "current_a": -12.5,
                    "soc_pct": 63.5,
                    "cells_v": CELLS,
                    "temps_c": [31.0, 30.5, 29.0, 30.0],
                    "cycles": 417,
                },
            }
            ev = events.Event(name, n + 1, prev[name], times[n * len(devices) + i], "health", "label", fields)
            raw = envelope.sign(events.encode(ev), key)
            prev[name] = envelope.envelope_hash(raw)
            out.append((f"bt/v1/{name}/events", raw))
    return out


class Bench:
    def __init__(self, workdir: Path, broker: Broker, devices: list[tuple[str, keys.PrivateKey]]) -> None:
        self.workdir = workdir
        self.broker = broker
        self.devices = devices
        self.server_key = workdir / "server.key"
        keys.save_private(keys.generate(), self.server_key)
        self.runs = 0

    def _store(self, url: str) -> Store:
        store = Store(url)
        for name, key in self.devices:
            store.enroll(name, "swap_operator", key.public, "bench", time.time() - 86400)
        return store

    def _collectors(self, url: str, n: int) -> list:
        self.runs += 1
        procs = []
        for i in range(n):
            name = f"bench-{self.runs}-{i}"
            cfg = collectors.write_config(
                self.workdir / f"{name}.toml",
                url,
                self.broker,
                name,
                self.server_key,
                batch_ms=50,
                batch_max=500,
                receive_max=2000,
            )
            log = self.workdir / f"{name}.log"
            procs.append((collectors.start(cfg, log), cfg, log))
        for _, _, log in procs:
            collectors.wait_subscribed(log)
        return procs

    def drain(self, url: str, messages: list[tuple[str, bytes]], n: int) -> float:
        """Events per second for ``n`` collectors draining pre-queued messages."""
        store = self._store(url)
        procs = self._collectors(url, n)
        for p, _, _ in procs:  # sessions stay: the broker queues for them while they are away
            p.send_signal(signal.SIGTERM)
            p.wait(30)
        publisher = Publisher(self.broker, f"bench-pub-{self.runs}")
        publisher.publish(messages)
        publisher.close()
        restarted = [collectors.start(cfg, log) for _, cfg, log in procs]
        # Steady state: the rate between 20 % and 95 % of the events (start-up and the tail excluded).
        low, high = int(0.2 * len(messages)), int(0.95 * len(messages))
        marks: dict[str, tuple[float, int]] = {}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            count = store.counts()["events"]
            now = time.perf_counter()
            if count >= low and "low" not in marks:
                marks["low"] = (now, count)
            if count >= high:
                marks["high"] = (now, count)
                break
            time.sleep(0.02)
        (t1, n1), (t2, n2) = marks["low"], marks["high"]
        rate = (n2 - n1) / (t2 - t1)
        self._stop([(p, cfg) for p, (_, cfg, _) in zip(restarted, procs, strict=True)])
        store.close()
        return rate

    def _stop(self, procs: list) -> None:
        """Stop collectors for good: end their sessions, or the broker would keep queueing their share."""
        for p, cfg in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
            collectors.end_session(self.broker, cfg.stem)

    def latency(self, url: str, rate: float, seconds: float, n: int = 1) -> dict[str, float]:
        """Seal -> receipt at a steady ``rate`` with ``n`` collectors: p50, p99 and max in milliseconds."""
        count = int(rate * seconds)
        per_device = max(1, count // len(self.devices))
        start_ms = int(time.time() * 1000)
        times = [start_ms + int(i * 1000 / rate) for i in range(per_device * len(self.devices))]
        messages = seal_fleet(self.devices, per_device, times)  # the devices' clocks: content only
        store = self._store(url)
        procs = self._collectors(url, n)
        server_public = keys.load_private(self.server_key).public
        listener = Publisher(self.broker, f"bench-receipts-{self.runs}", subscribe="bt/v1/+/receipts")
        arrivals: dict[str, list[tuple[float, int]]] = {}
        lock = threading.Lock()
        kids = {name: key.public.kid for name, key in self.devices}

        def on_receipt(client, userdata, message):
            device = message.topic.split("/")[2]
            r = receipts.verify(message.payload, [server_public], device, {kids[device]})
            with lock:
                arrivals.setdefault(device, []).append((time.time(), r.watermark))

        listener.client.on_message = on_receipt
        publisher = Publisher(self.broker, f"bench-steady-{self.runs}")
        # Each event is published at its moment of a steady schedule that starts now, after sealing and
        # start-up (sealing them all takes seconds): latency runs from that moment, when a device would
        # have sealed and sent it.
        begin = time.time() + 0.5
        sent = [begin + i / rate for i in range(len(messages))]
        for (topic, raw), at in zip(messages, sent, strict=True):
            delay = at - time.time()
            if delay > 0:
                time.sleep(delay)
            publisher.client.publish(topic, raw, qos=1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with lock:
                if len(arrivals) == len(self.devices) and all(a[-1][1] >= per_device for a in arrivals.values()):
                    break
            time.sleep(0.05)
        latencies = []
        for n, ((topic, _), at) in enumerate(zip(messages, sent, strict=True)):
            device, seq = topic.split("/")[2], n // len(self.devices) + 1
            covered = next(t for t, w in arrivals[device] if w >= seq)
            latencies.append((covered - at) * 1000)
        for c in (publisher, listener):
            c.close()
        self._stop([(proc, cfg) for proc, cfg, _ in procs])
        store.close()
        q = statistics.quantiles(latencies, n=100)
        return {"p50_ms": q[49], "p99_ms": q[98], "max_ms": max(latencies), "events": len(latencies)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=30000, help="events per drain run (default: %(default)s)")
    p.add_argument("--devices", type=int, default=20, help="devices sending them (default: %(default)s)")
    p.add_argument("--pg-url", help="a PostgreSQL server to create a scratch database on (default: a private one)")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--latency-seconds", type=float, default=10.0)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bt-bench-"))
    print(f"machine: {describe()}")
    devices = [(f"station-{i:03d}", keys.generate()) for i in range(args.devices)]
    per_device = args.events // args.devices
    t0 = int(time.time() * 1000) - 3_600_000
    print(f"sealing {per_device * args.devices} health events of {args.devices} devices (24 cells each)...", flush=True)
    messages = seal_fleet(devices, per_device, [t0 + i for i in range(per_device * args.devices)])
    print(f"envelope size: {len(messages[0][1])} bytes")
    results: dict[str, object] = {"machine": describe(), "events": len(messages), "devices": args.devices}
    with Broker(workdir / "broker") as broker:
        public = {k.public.kid: k.public for _, k in devices}
        bench = Bench(workdir, broker, devices)
        cluster = None
        for backend in args.backends.split(","):
            if backend == "sqlite":
                url_for = lambda tag: f"sqlite:{workdir / f'{tag}.sqlite'}"  # noqa: E731
            else:
                if args.pg_url:
                    import psycopg

                    def url_for(tag: str) -> str:
                        name = f"bt_bench_{tag}_{int(time.time())}"
                        with psycopg.connect(args.pg_url, autocommit=True) as conn:
                            conn.execute(f'CREATE DATABASE "{name}"')
                        return args.pg_url.rsplit("/", 1)[0] + "/" + name
                else:
                    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="bt-bench-pg-")), durable=True)
                    url_for = cluster.init().start().create_database
            # The limits are measured again for each backend, right before its collectors run: this
            # VM's speed drifts by tens of per cent within minutes.
            verify = limits.verify_rates([raw for _, raw in messages], public)
            receive = limits.receive_rate(broker, messages)
            rows = [
                (envelope.decode(raw).kid, i, "d", "health", i, bytes(32), json.dumps({"x": 1}), raw)
                for i, (_, raw) in enumerate(messages)
            ]
            insert = limits.insert_rate(url_for("insert"), rows)
            ceiling = limits.composed(receive, verify["batch"], insert)
            stage_store = bench._store(url_for("stages"))
            stages = limits.stage_rates(stage_store, messages)
            stage_store.close()
            serial = limits.composed(receive, stages["check"], stages["commit"])
            one = bench.drain(url_for("one"), messages, 1)
            two = bench.drain(url_for("two"), messages, 2)
            lat = bench.latency(url_for("latency"), rate=one / 2, seconds=args.latency_seconds)
            lat2 = bench.latency(url_for("latency2"), rate=one / 2, seconds=args.latency_seconds, n=2)
            print(f"\n[{backend}]")
            print(f"limit receive  {receive:10,.0f} msg/s  (broker -> one subscriber, QoS 1)")
            print(
                f"limit verify   {verify['batch']:10,.0f} /s     the collector's batch call; PyNaCl per call "
                f"{verify['pynacl']:,.0f} /s, cryptography {verify['cryptography']:,.0f} /s"
            )
            print(
                f"  beside a busy Python thread: batch call {verify['batch_beside_busy']:,.0f} /s, "
                f"PyNaCl per call {verify['pynacl_beside_busy']:,.0f} /s"
            )
            print(f"limit insert   {insert:10,.0f} rows/s (batches of 500, as the store inserts)")
            print(f"composed limit {ceiling:10,.0f} /s    1/(1/receive + 1/verify + 1/insert)")
            print(f"stage check    {stages['check']:10,.0f} /s    parse, verify, decode and validate; one thread")
            print(f"stage commit   {stages['commit']:10,.0f} /s    events, chains, codes, rules, receipts")
            print(f"serial ceiling {serial:10,.0f} /s    1/(1/receive + 1/check + 1/commit): no overlap at all")
            print(
                f"1 collector    {one:10,.0f} events/s verified and stored  = {one / ceiling:.2f} of the composed limit"
                f", {one / serial:.2f} of the serial ceiling"
            )
            print(f"2 collectors   {two:10,.0f} events/s                      = {two / one:.2f} x one collector")
            print(
                f"latency at {one / 2:,.0f}/s: seal -> receipt p50 {lat['p50_ms']:.0f} ms, "
                f"p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']:.0f} ms ({lat['events']} events), one collector"
            )
            print(
                f"latency at {one / 2:,.0f}/s: seal -> receipt p50 {lat2['p50_ms']:.0f} ms, "
                f"p99 {lat2['p99_ms']:.0f} ms, max {lat2['max_ms']:.0f} ms ({lat2['events']} events), two collectors"
            )
            results[backend] = {
                "limits": {"receive": receive, "verify": verify, "insert": insert},
                "composed": ceiling,
                "stages": stages,
                "serial": serial,
                "one": one,
                "two": two,
                "latency": lat,
                "latency_two": lat2,
            }
        if cluster:
            cluster.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
