"""The demo (`bash scripts/demo.sh`): the whole system on this machine, through the real programs.

A private mosquitto; ``battery-server run`` on SQLite with its dashboard; three swap stations (GB/T
27930 BMSs on slcan USB-CAN adapters, label scanners, a PLC), a maintenance rig (a Daly BMS), a BMS
gateway (a JBD BMS) as ``battery-agent run`` processes; a manufacturer, a vehicle maker, a scrapper
and a recycler submitting events from files with ``battery-agent emit``; and a misbehaving device.

One battery lives a whole life meanwhile (produced, installed, swapped twice, serviced, scrapped with
its vehicle, handed over, recycled) and its trace ends the run, after a summary of what every stage
did. The dashboard's address is printed while it runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.protocol import cbor, envelope, events, keys

from harness.broker import Broker, BrokerUnavailable, free_port
from harness.demo_sites import Gateway, Rig, Site, Submitter, SwapStation, cli
from harness.publisher import Publisher

CODES = {n: f"0RJPEA00HAU0AAG1C3000{n}" for n in range(101, 111)}
HERO = CODES[101]
VINS = {n: events.with_check_digit(f"LNBSCB3F0PW10000{n}") for n in range(1, 5)}


def pack(n: int, soc: float) -> gbt27930_bms.Pack:
    """The BMS of battery ``n``: its BRM identity (manufacturer + serial + date) is its own."""
    return gbt27930_bms.Pack(serial=0x12300 + n, soc_pct=soc, vin="")


class Demo:
    def __init__(self, workdir: Path, duration: float) -> None:
        self.dir = workdir
        self.duration = duration
        self.server_toml = workdir / "server" / "server.toml"
        self.record = workdir / "server" / "record.sqlite"
        self.step = "starting"
        self.story_error: str | None = None
        self.sites: dict[str, Site] = {}
        self.server: Any = None

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self, broker: Broker) -> None:
        (self.dir / "server").mkdir(parents=True, exist_ok=True)
        self.web_port = free_port()
        self.server_toml.write_text(
            "# written by the demo\n"
            '[store]\nurl = "sqlite:record.sqlite"\n[server]\nkey = "server.key"\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            "[intake]\nbatch_ms = 20\nsweep_interval_s = 5\n"
            f'[web]\nlisten = "127.0.0.1:{self.web_port}"\ntoken_file = "web.token"\n'
        )
        cli("battery_trace.server.cli", "init", "-c", str(self.server_toml))  # the key and token, once
        server_hex = cli("battery_trace.server.cli", "pubkey", "-c", str(self.server_toml)).stdout.strip()
        d = self.dir / "sites"
        self.stations = [
            SwapStation(f"station-{n}", "swap_operator", "swap_station", d / f"station-{n}") for n in (1, 2, 3)
        ]
        self.rig = Rig("rig-1", "maintenance", "maintenance_rig", d / "rig-1")
        self.gateway = Gateway("gateway-1", "gateway", "gateway", d / "gateway-1")
        self.submitters = {
            role: Submitter(f"{role.replace('_', '-')}-1", role, "submitter", d / role)
            for role in ("manufacturer", "vehicle_maker", "scrapper", "recycler")
        }
        self.rogue = Site("rogue-1", "swap_operator", "submitter", d / "rogue-1")
        every: list[Site] = [*self.stations, self.rig, self.gateway, *self.submitters.values(), self.rogue]
        for site in every:
            site.prepare(self.server_toml)
            self.sites[site.name] = site
        for station in self.stations:
            station.build(2)
            station.write(
                server_hex,
                broker,
                station.body(),
                health_interval_s=3.0,
                extra_site="absent_after_s = 2\nidentity_wait_s = 20\n",
            )
        self.rig.build(HERO)
        self.rig.write(server_hex, broker, self.rig.body(), health_interval_s=5.0, extra_site="absent_after_s = 2\n")
        self.gateway.build(CODES[104])
        self.gateway.write(server_hex, broker, self.gateway.body(), health_interval_s=2.0)
        for submitter in self.submitters.values():
            submitter.write(server_hex, broker)

    def start(self) -> None:
        from harness import collectors

        log_path = self.dir / "server" / "server.log"
        earlier = log_path.read_text().count("subscribed to") if log_path.exists() else 0  # a continued run
        log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
        import subprocess

        self.server = subprocess.Popen(
            [sys.executable, "-m", "battery_trace.server.cli", "run", "-c", str(self.server_toml)],
            stdout=log,
            stderr=log,
        )
        # The sites start once the collector listens, so their first events are not published to no one.
        collectors.wait_subscribed(log_path, after=earlier)
        token_file = self.dir / "server" / "web.token"  # written by `init` in setup
        self.url = f"http://127.0.0.1:{self.web_port}/#token={token_file.read_text().strip()}"
        for site in [*self.stations, self.rig, self.gateway]:
            site.start()

    def stop(self) -> None:
        from harness import agents

        for site in self.sites.values():
            site.stop()
        if self.server is not None:
            agents.stop(self.server)

    # -- the story --------------------------------------------------------------------------------

    def _wait(self, what: str, condition: Callable[[], Any], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.2)
        raise TimeoutError(what)

    def _stored(self, event_type: str) -> int:
        return _count(self.record, "SELECT COUNT(*) FROM events WHERE type = ?", (event_type,))

    def _emit(self, role: str, name: str, lines: list[dict[str, Any]]) -> None:
        done = self.submitters[role].emit_file(name, lines)
        if done.returncode != 0:
            raise RuntimeError(f"{role} could not submit {name}: {done.stderr.strip()}")

    def _swap(self, station: SwapStation, vin: str, out_slot: int, out_code: str, out_pack: Any, in_slot: int) -> None:
        before = self._stored("swapped")
        station.plc.send(f"VEHICLE {vin}")
        station.plc.send(f"OUT {out_slot}")
        # The robot puts the battery in its slot once the PLC has announced it, as a real bay does.
        self._wait("the station to see the vehicle in the bay", lambda: self._bay(station).get("slot_out") == out_slot)
        station.put(out_slot, out_code, out_pack)
        station.plc.send(f"IN {in_slot}")
        station.slots[in_slot].remove()
        station.plc.send("DONE")
        self._wait(f"the swap of {vin} to be stored", lambda: self._stored("swapped") > before)

    @staticmethod
    def _bay(station: SwapStation) -> dict[str, Any]:
        return station.status().get("bay") or {}

    def _slot_ready(self, station: SwapStation, slot: int, code: str) -> bool:
        """The station knows the battery in the slot: its code, and some health from its BMS."""
        state = station.status().get("slots", {}).get(str(slot), {})
        return state.get("code") == code and bool(state.get("health"))

    def story(self) -> None:
        try:
            self._story()
            self.step = "the story is told; devices keep reporting health"
            (self.dir / "story.done").write_text(time.ctime())
        except Exception as exc:  # the demo goes on and says what went wrong
            self.story_error = f"{self.step}: {exc}"

    def _story(self) -> None:
        st1, st2, _ = self.stations
        self.step = "manufacturer: 10 packs produced (production-day.jsonl)"
        self._emit(
            "manufacturer",
            "production-day.jsonl",
            [
                {"type": "produced", "code": c, "chemistry": "lfp", "rated_capacity_ah": 150, "rated_energy_kwh": 52.5}
                for c in CODES.values()
            ],
        )
        self.step = "vehicle maker: 4 vehicles built and sold (vehicles.jsonl)"
        self._emit(
            "vehicle_maker",
            "vehicles.jsonl",
            [{"type": "installed", "code": CODES[100 + n], "vin": VINS[n]} for n in range(1, 5)]
            + [{"type": "sold", "vin": VINS[n], "buyer_kind": "individual"} for n in range(1, 5)],
        )
        self.step = "stations take stock"
        st1.put(1, CODES[105], pack(105, 96))
        st2.put(1, CODES[106], pack(106, 97))
        self.stations[2].put(1, CODES[107], pack(107, 95))
        self._wait("station-1 to read slot 1", lambda: self._slot_ready(st1, 1, CODES[105]))
        self._wait("station-2 to read slot 1", lambda: self._slot_ready(st2, 1, CODES[106]))
        self.step = f"station-1: {VINS[1]} swaps {HERO} (18 %) for {CODES[105]}"
        self._swap(st1, VINS[1], 2, HERO, pack(101, 18), 1)
        self.step = f"station-1: {VINS[2]} swaps {CODES[102]} for {HERO}"
        self._wait("station-1 to read slot 2", lambda: self._slot_ready(st1, 2, HERO))
        self._swap(st1, VINS[2], 1, CODES[102], pack(102, 22), 2)
        self.step = f"station-2: {VINS[3]} swaps {CODES[103]} for {CODES[106]}"
        self._swap(st2, VINS[3], 2, CODES[103], pack(103, 31), 1)
        self.step = f"rig-1: a technician services {HERO} (from {VINS[2]})"
        self.rig.connect_pack()
        self._wait(
            "the rig to read the pack", lambda: self.rig.status().get("slots", {}).get("1", {}).get("code") == HERO
        )
        done = self.rig.confirm("rebalance", "--note", "cell 3 low, balanced")
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip())
        self.rig.disconnect_pack()  # the pack goes back into the vehicle
        # An agent that does not answer a poll (status() is {} then) has not seen the pack go yet.
        self._wait(
            "the rig to see the pack gone",
            lambda: "slots" in (status := self.rig.status()) and not status["slots"].get("1", {}).get("occupied"),
        )
        self.step = f"scrapper: {VINS[2]} scrapped with {HERO}, handed to the recycler"
        self._emit(
            "scrapper",
            "intake.jsonl",
            [
                {"type": "vehicle_scrapped", "vin": VINS[2], "codes": [HERO]},
                {
                    "type": "handed_over",
                    "code": HERO,
                    "from_entity": "Demo Scrap Co",
                    "to_entity": "Demo Recycling",
                    "to_role": "recycler",
                },
                {"type": "vehicle_scrapped", "vin": VINS[3], "codes": []},  # its battery is missing: a finding
            ],
        )
        self.step = f"recycler: {HERO} recycled"
        self._emit(
            "recycler",
            "recovered.jsonl",
            [
                {
                    "type": "recycled",
                    "code": HERO,
                    "mass_kg": 312.5,
                    "materials": {"li": 4.1, "co": 0.0, "ni": 0.0, "mn": 0.2},
                }
            ],
        )
        self.step = "a misbehaving device: forged, replayed, foreign and unknown messages"
        self._misbehave()

    def _misbehave(self) -> None:
        rogue = keys.load_private(self.rogue.key)
        stranger = keys.generate()
        now = int(time.time() * 1000)

        def event(seq: int, event_type: str, fields: dict[str, Any], device: str = "rogue-1") -> bytes:
            ev = events.Event(
                device, seq, events.ZERO_HASH if seq == 1 else bytes(32), now, event_type, "manual", fields
            )
            return events.encode(ev)

        health = {"code": CODES[108], "health": {"soc_pct": 50}}
        first = envelope.sign(event(1, "health", health), rogue)
        protected = cbor.encode({1: -8, 4: rogue.public.kid})
        payload = event(2, "health", health)
        forged = cbor.encode(
            cbor.Tag(18, [protected, {}, payload, stranger.sign(cbor.encode(["Signature1", protected, b"", payload]))])
        )
        messages = [
            ("bt/v1/rogue-1/events", first),
            ("bt/v1/rogue-1/events", first),  # an exact replay: acknowledged, stored once
            ("bt/v1/rogue-1/events", envelope.sign(event(1, "health", {**health, "slot": 9}), rogue)),  # reused seq
            ("bt/v1/rogue-1/events", forged),
            (
                "bt/v1/rogue-1/events",
                envelope.sign(
                    event(
                        2,
                        "produced",
                        {"code": CODES[109], "chemistry": "lfp", "rated_capacity_ah": 1, "rated_energy_kwh": 1},
                    ),
                    rogue,
                ),
            ),  # not its role
            ("bt/v1/station-1/events", envelope.sign(event(2, "health", health), rogue)),  # another device's topic
            ("bt/v1/ghost-7/events", envelope.sign(event(1, "health", health, "ghost-7"), stranger)),  # not enrolled
        ]
        publisher = Publisher(self.broker, "demo-rogue")
        publisher.publish(messages)
        publisher.close()

    # -- watching ---------------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        outboxes = [s.dir / f"{s.name}-outbox.sqlite" for s in self.sites.values()]
        sealed = sum(_count(o, "SELECT COALESCE(MAX(last_seq), 0) FROM chain") for o in outboxes)
        waiting = sum(_count(o, "SELECT COUNT(*) FROM outbox") for o in outboxes)  # receipted ones are pruned
        return {
            "sealed": sealed,
            "delivered": sealed - waiting,
            "stored": _count(self.record, "SELECT COUNT(*) FROM events"),
            "rejected": _count(self.record, "SELECT COUNT(*) FROM quarantine"),
            "findings": _count(self.record, "SELECT COUNT(*) FROM findings WHERE resolved_at IS NULL"),
        }

    def watch(self) -> None:
        tty = sys.stdout.isatty()
        started = time.monotonic()
        last_print = -10.0
        while (elapsed := time.monotonic() - started) < self.duration:
            f = self.figures()
            line = (
                f"[{elapsed:4.0f}/{self.duration:.0f}s] sealed {f['sealed']:>5}  delivered {f['delivered']:>5}  "
                f"stored {f['stored']:>5}  "
                f"rejected {f['rejected']:>3}  open findings {f['findings']:>2}  | {self.step}"
            )
            if tty:
                print("\r" + line[:150].ljust(150), end="", flush=True)
            elif elapsed - last_print >= 10:
                print(line, flush=True)
                last_print = elapsed
            time.sleep(0.5)
        if tty:
            print()

    def summary(self) -> None:
        from battery_trace.server.store import Store

        store = Store(f"sqlite:{self.record}")
        counts = store.counts()
        f = self.figures()
        print("\n== What happened ==")
        print(f"  sealed by the agents and submitters   {f['sealed']}")
        print(f"  delivered (receipted by the server)   {f['delivered']}")
        print(f"  stored by the server                  {counts['events']}")
        print(f"  rejected (quarantined) by reason      {json.dumps(counts['rejected'])}")
        print(f"  open findings by kind                 {json.dumps(counts['findings_open'])}")
        by_type = dict(
            store.db.reading().__enter__().all("SELECT type, COUNT(*) FROM events GROUP BY type ORDER BY type")
        )
        print(f"  events by type                        {json.dumps(by_type)}")
        if self.story_error:
            print(f"\n  the story stopped at: {self.story_error} (logs in {self.dir})")
        store.close()
        print(f"\n== The life of battery {HERO} (battery-server trace) ==")
        print(cli("battery_trace.server.cli", "trace", HERO, "-c", str(self.server_toml), check=False).stdout.rstrip())
        print(f"\nData and logs: {self.dir}. Run again to continue, or with --fresh to start clean.")


def _count(db: Path, sql: str, params: tuple = ()) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
            return conn.execute(sql, params).fetchone()[0] or 0
    except sqlite3.OperationalError:
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/demo.sh",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  bash scripts/demo.sh\n  bash scripts/demo.sh --duration 120 --fresh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds to run (default: %(default)s)")
    p.add_argument("--workdir", default="demo-data", help="where data and logs go (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo data and start clean")
    args = p.parse_args(argv)
    if args.duration <= 0:
        p.error("--duration must be positive")
    workdir = Path(args.workdir).resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    continuing = (workdir / "story.done").exists()
    print(
        f"battery-trace demo: {'continuing with' if continuing else 'starting clean in'} {workdir} "
        f"for {args.duration:.0f} s"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        broker = Broker(workdir / "broker").start()
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    demo = Demo(workdir, args.duration)
    demo.broker = broker
    try:
        print("  setting up: keys, enrolment, configs for 10 devices...", flush=True)
        demo.setup(broker)
        demo.start()
        print(f"  broker     mosquitto on {broker.host}:{broker.port} (private to this demo)")
        print(f"  dashboard  {demo.url}")
        if continuing:
            demo.step = "continuing: the devices report health (the story ran before; --fresh replays it)"
        else:
            threading.Thread(target=demo.story, daemon=True).start()
        demo.watch()
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        demo.stop()
        broker.stop()
    demo.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
