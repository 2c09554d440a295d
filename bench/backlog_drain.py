"""Backlog drain after a broker outage: a real 16-slot agent keeps sealing (16 events/s) while the
broker is down for --outage seconds (default 600), then the broker comes back and the agent
delivers its backlog to a real collector while it goes on sealing.

Reported: the backlog when the broker returned, how long the agent took to reconnect (its backoff
is capped at 30 s), the time to drain and the drain rate (events delivered and receipted per
second), next to the limits measured in the same run: one MQTT connection publishing at QoS 1 with
the agent's in-flight window, and one subscriber receiving.

    .venv/bin/python -m bench.backlog_drain [--outage 600] [--slots 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from battery_trace.protocol import keys
from battery_trace.server.store import Store

from bench import limits
from bench.agent_footprint import recording, station
from bench.collector_rates import Bench
from bench.machine import describe
from harness import agents
from harness.broker import Broker
from harness.waiting import wait_until

IN_FLIGHT = 200  # the agent's default max_in_flight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outage", type=float, default=600.0, help="seconds the broker is down (default 600)")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bt-drain-"))
    print(f"machine: {describe()}")
    with Broker(workdir / "broker") as broker:
        with (
            recording(workdir, broker) as (store, server_key),
            station(workdir, broker, store, server_key, args.slots) as (_, port),
        ):

            def status() -> dict:
                return agents.status(port) or {}

            wait_until(lambda: store.counts()["events"] >= 3 * args.slots, 60, "the agent delivering")
            broker.kill()
            print(f"broker killed; down for {args.outage:.0f} s while the agent seals...", flush=True)
            down = time.monotonic()
            while time.monotonic() - down < args.outage:
                time.sleep(min(30.0, args.outage - (time.monotonic() - down)))
                s = status()
                print(
                    f"  {time.monotonic() - down:>5.0f} s down: backlog {s['outbox']['depth']:,} events, "
                    f"outbox {s['outbox']['bytes'] / 1e6:.1f} MB",
                    flush=True,
                )
            broker.start()
            backlog_up = status()["outbox"]["depth"]
            reconnect = wait_until(lambda: status()["uplink"]["connected"], 120, "the agent reconnecting", every=0.05)
            s = status()
            backlog, sealed0, stored0 = s["outbox"]["depth"], s["sealer"]["sealed"], store.counts()["events"]
            print(
                f"broker back; agent reconnected after {reconnect:.1f} s with {backlog:,} events to deliver", flush=True
            )
            t0 = time.monotonic()
            steady = 2 * args.slots  # what is normally in flight: a second of sealing, receipted shortly
            last = t0
            while status()["outbox"]["depth"] > steady:
                time.sleep(0.05)
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    print(f"  draining: {status()['outbox']['depth']:,} left", flush=True)
                if time.monotonic() - t0 > 3600:
                    raise TimeoutError("the backlog did not drain within an hour")
            drain = time.monotonic() - t0
            s = status()
            delivered = store.counts()["events"] - stored0
            sealed_meanwhile = s["sealer"]["sealed"] - sealed0
            envelopes = [("bt/v1/bench-station/events", raw) for _, raw in store.chain(_kid(store))[:5000]]
        # The collector alone, draining the same envelopes (already queued at the broker) into a fresh record.
        station_key = keys.load_private(workdir / "station.key")
        (workdir / "limit").mkdir()
        collector_rate = Bench(workdir / "limit", broker, [("bench-station", station_key)]).drain(
            f"sqlite:{workdir / 'limit' / 'record.sqlite'}", envelopes, 1
        )
        publish = limits.publish_rate(
            broker, [(t.replace("bench-station", "bench-limit"), r) for t, r in envelopes], IN_FLIGHT
        )
        receive = limits.receive_rate(broker, envelopes)
    rate = delivered / drain
    results = {
        "machine": describe(),
        "outage_s": args.outage,
        "slots": args.slots,
        "backlog_when_broker_returned": backlog_up,
        "reconnect_s": round(reconnect, 1),
        "backlog_at_reconnect": backlog,
        "drain_s": round(drain, 1),
        "delivered_during_drain": delivered,
        "sealed_during_drain": sealed_meanwhile,
        "drain_rate_per_s": round(rate),
        "limit_publish_per_s": round(publish),
        "limit_receive_per_s": round(receive),
        "limit_collector_per_s": round(collector_rate),
        "broker_up_to_drained_s": round(reconnect + drain, 1),
    }
    print(
        f"\nbacklog {backlog:,} events after {args.outage:.0f} s down; reconnect {reconnect:.1f} s; "
        f"drained in {drain:.1f} s while sealing {sealed_meanwhile} more"
    )
    print(f"drain rate     {rate:8,.0f} events/s delivered, stored and receipted")
    print(f"limit publish  {publish:8,.0f} msg/s  (one connection, QoS 1, {IN_FLIGHT} in flight)")
    print(f"limit receive  {receive:8,.0f} msg/s  (broker -> one subscriber)")
    print(f"limit collector {collector_rate:7,.0f} events/s (one collector draining the same envelopes, SQLite)")
    print(f"drain rate = {rate / publish:.2f} of the publish limit, {rate / collector_rate:.2f} of the collector's")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def _kid(store: Store) -> bytes:
    return store.device_keys("bench-station")[0].kid


if __name__ == "__main__":
    main()
