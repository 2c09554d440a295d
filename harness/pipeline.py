"""The whole pipeline on one machine, for fault injection and load: gateway agents polling JBD BMS
stubs on ptys, a private broker, two collector processes and the record, each part a real process
that a test can kill, stop and restart.

What was sealed is read from each agent's own outbox (its chain head survives pruning and
``kill -9``); what was stored is read from the record. ``settle()`` stops the sensors (each agent is
restarted as a submitter with the same key and outbox, so nothing new is sealed) and waits until
the record holds exactly 1..head of every device.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.protocol import keys
from battery_trace.server.audit import audit_chain
from battery_trace.server.store import Store, StoreUnavailable

from harness import agents, collectors
from harness.broker import Broker
from harness.waiting import wait_until

CODES = ("0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000131", "0RJPEA00HAU0AAG1C300014X")


def chain_head(outbox: Path) -> int:
    """The last sequence number an agent sealed (0 before its first), from its outbox on disk."""
    if not outbox.exists():
        return 0
    with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5) as db:
        try:
            return db.execute("SELECT COALESCE(MAX(last_seq), 0) FROM chain").fetchone()[0]
        except sqlite3.OperationalError:  # created, not yet migrated
            return 0


def quiet_config(config: Path) -> Path:
    """The agent's config as a submitter: same device, key, outbox and broker, no sensors, so it
    delivers what it sealed and seals nothing new."""
    text = config.read_text().replace('kind = "gateway"', 'kind = "submitter"')
    quiet = config.with_name(config.stem + "-deliver.toml")
    quiet.write_text(text[: text.index("[[slots]]")] if "[[slots]]" in text else text)
    return quiet


@dataclass
class Gateway:
    device: str
    config: Path
    port: int
    outbox: Path
    log: Path
    links: list[PtyLink]
    bmss: list[JbdBms]
    clock_offset_s: float = 0.0
    process: subprocess.Popen[bytes] | None = None

    def start(self, config: Path | None = None) -> None:
        if self.clock_offset_s:
            # The device's wall clock is off (its RTC), its monotonic clock is not: only time.time moves.
            code = (
                "import sys, time; _t = time.time; "
                f"time.time = lambda: _t() + {self.clock_offset_s!r}; "
                "from agent.cli import main; sys.exit(main(sys.argv[1:]))"
            )
            with open(self.log, "ab") as out:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", code, "run", "-c", str(config or self.config)], stdout=out, stderr=out
                )
        else:
            self.process = agents.start(config or self.config, self.log)

    def head(self) -> int:
        return chain_head(self.outbox)

    def unreceipted_up_to(self, seq: int) -> int:
        """How many of events 1..seq the outbox still holds (a receipt covering them prunes them)."""
        with sqlite3.connect(f"file:{self.outbox}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM outbox WHERE seq <= ?", (seq,)).fetchone()[0]


@dataclass
class CollectorProcess:
    name: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.process = collectors.start(self.config, self.log)
        collectors.wait_subscribed(self.log, after=self.starts)
        self.starts += 1


@dataclass
class Report:
    sealed: dict[str, int]
    stored: int
    duplicates_dropped: int
    chains_intact: bool
    rejected: int  # anything quarantined: a pipeline under faults must not make its own events look forged


class Pipeline:
    def __init__(
        self,
        workdir: Path,
        broker: Broker,
        store_url: str,
        devices: int = 3,
        collector_count: int = 2,
        slots: int = 2,
        health_interval_s: float = 0.1,
        resend_after_s: float = 2.0,
        clock_offsets_s: dict[str, float] | None = None,
    ) -> None:
        self.workdir = workdir
        self.broker = broker
        self.url = store_url
        self.store = Store(store_url)
        self.server_key = workdir / "server.key"
        keys.save_private(keys.generate(), self.server_key)
        server_public = keys.load_private(self.server_key).public.hex
        self.collectors = [
            CollectorProcess(
                f"c{i}",
                collectors.write_config(workdir / f"c{i}.toml", store_url, broker, f"c{i}", self.server_key),
                workdir / f"c{i}.log",
            )
            for i in range(1, collector_count + 1)
        ]
        self.gateways: list[Gateway] = []
        for i in range(1, devices + 1):
            name = f"gw-{i}"
            key = workdir / f"{name}.key"
            keys.save_private(keys.generate(), key)
            self.store.enroll(name, "gateway", keys.load_private(key).public, None, 0.0)
            links = [PtyLink(workdir / f"{name}-bms{n}") for n in range(1, slots + 1)]
            body = "".join(
                f'[[slots]]\nslot = {n}\ncode = "{CODES[(i + n) % len(CODES)]}"\n[slots.serial]\nport = "{link.path}"\n'
                'protocol = "jbd"\npoll_interval_s = 0.1\ntimeout_s = 0.3\n'
                for n, link in enumerate(links, 1)
            )
            config, port = agents.write_config(
                workdir / f"{name}.toml",
                name,
                key,
                server_public,
                broker,
                "gateway",
                body,
                role="gateway",
                health_interval_s=health_interval_s,
                resend_after_s=resend_after_s,
            )
            outbox, log = workdir / f"{name}-outbox.sqlite", workdir / f"{name}.log"
            offset = (clock_offsets_s or {}).get(name, 0.0)
            self.gateways.append(
                Gateway(name, config, port, outbox, log, links, [JbdBms(link, PackState()) for link in links], offset)
            )

    def start(self) -> Pipeline:
        for c in self.collectors:
            c.start()
        for g in self.gateways:
            for bms in g.bmss:
                bms.start()
            g.start()
        return self

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [p.process for p in [*self.collectors, *self.gateways] if p.process is not None]

    # -- what was sealed and what was stored ------------------------------------------------------------

    def heads(self) -> dict[str, int]:
        return {g.device: g.head() for g in self.gateways}

    def stored(self) -> dict[str, list[int]] | None:
        """Sequence numbers stored per device, or None while the record is unreachable."""
        try:
            with self.store.db.reading() as tx:
                rows = tx.all("SELECT device, seq FROM events ORDER BY device, seq")
        except StoreUnavailable:
            return None
        out: dict[str, list[int]] = {g.device: [] for g in self.gateways}
        for device, seq in rows:
            out.setdefault(device, []).append(seq)
        return out

    def covers(self, heads: dict[str, int]) -> bool:
        stored = self.stored()
        return stored is not None and all(set(range(1, n + 1)) <= set(stored.get(d, [])) for d, n in heads.items())

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds until ``condition()`` holds, failing early if a part of the pipeline dies."""
        return wait_until(condition, timeout, what, self.processes())

    def recovery(self, timeout: float = 60, ahead: int = 0) -> float:
        """From now (the fault just cleared): seconds until everything sealed so far is stored, and
        ``ahead`` more events of every device (1: a restarted agent is delivering again)."""
        heads = {d: n + ahead for d, n in self.heads().items()}
        return self.wait_for(lambda: self.covers(heads), timeout, f"the record to hold {heads}")

    def flowing(self, events: int = 30, timeout: float = 30) -> None:
        """Until every device has sealed and the record has stored at least ``events`` more of it."""
        start = self.stored() or {}
        self.wait_for(
            lambda: all(len(s) >= len(start.get(d, [])) + events for d, s in (self.stored() or {}).items()),
            timeout,
            f"{events} more events of every device in the record",
        )

    # -- faults -------------------------------------------------------------------------------------------

    def kill_collector(self, index: int = 0) -> None:
        c = self.collectors[index]
        assert c.process is not None
        c.process.send_signal(signal.SIGKILL)
        c.process.wait()
        c.process = None  # down on purpose: not a process that died

    def kill_agent(self, index: int = 0) -> None:
        g = self.gateways[index]
        assert g.process is not None
        g.process.send_signal(signal.SIGKILL)
        g.process.wait()
        g.process = None

    # -- the end ------------------------------------------------------------------------------------------

    def settle(self, timeout: float = 90) -> Report:
        """Stop sealing, deliver everything, and check the record: exactly 1..head of every device,
        every chain verified link by link from the stored envelopes."""
        for g in self.gateways:
            assert g.process is not None
            agents.stop(g.process)
            for bms in g.bmss:
                bms.stop()
        sealed = self.heads()
        for g in self.gateways:
            g.start(quiet_config(g.config))
        self.wait_for(
            lambda: self.stored() == {d: list(range(1, n + 1)) for d, n in sealed.items()},
            timeout,
            f"exactly {sealed} in the record",
        )
        intact = True
        for g in self.gateways:
            for key in self.store.device_keys(g.device):
                intact &= audit_chain(key, self.store.chain(key.kid)).first_break is None
        for c in self.collectors:
            if c.process is not None and c.process.poll() is None:
                c.process.send_signal(signal.SIGTERM)
                c.process.wait(timeout=30)
        dropped = sum(collectors.counters(c.log)["duplicates"] for c in self.collectors)
        with self.store.db.reading() as tx:
            rejected = tx.one("SELECT COUNT(*) FROM quarantine")[0]
        return Report(sealed, sum(sealed.values()), dropped, intact, rejected)

    def close(self) -> None:
        for g in self.gateways:
            if g.process is not None:
                agents.stop(g.process)
            for bms, link in zip(g.bmss, g.links, strict=True):
                bms.stop()
                link.close()
        for c in self.collectors:
            if c.process is not None and c.process.poll() is None:
                c.process.kill()
                c.process.wait()
        self.store.close()
