"""``battery-demo``: the whole pipeline on this machine, through the real programs.

A private mosquitto, ``battery-server run`` on SQLite, an emulated JBD BMS on a pty and
``battery-agent run`` reading it as a BMS gateway. While it runs, a progress line shows what each
stage has done; at the end it prints a summary and verifies one stored event independently, the way
an auditor would, with ``battery-server verify`` and only the device's public key.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from firmware_stubs.jbd_bms import JbdBms, PackState
from firmware_stubs.pty_link import PtyLink
from harness.broker import Broker, BrokerUnavailable, free_port

DEVICE = "gateway-demo-1"
CODE = "0RJPEA00HAU0AAG1C3000123"


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _cli(module: str, *args: str) -> str:
    done = subprocess.run(_python(module, *args), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def _count(db: Path, sql: str) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
            return conn.execute(sql).fetchone()[0] or 0
    except sqlite3.OperationalError:
        return 0


def _drive(bms: JbdBms, stop: threading.Event) -> None:
    """A pack in service: discharging slowly, warming a little, cells drifting apart."""
    state = bms.state
    while not stop.wait(1.0):
        state.soc_pct = max(5, state.soc_pct - 1)
        state.voltage_v = round(46.0 + state.soc_pct * 0.12, 2)
        state.current_a = -round(12 + (time.time() % 7), 1)
        state.temps_c = [round(t + 0.1, 1) for t in state.temps_c]
        state.cells_mv = [mv - 2 - (i % 3) for i, mv in enumerate(state.cells_mv)]


class Demo:
    def __init__(self, workdir: Path, duration: float) -> None:
        self.dir = workdir
        self.duration = duration
        self.server_toml = workdir / "server.toml"
        self.agent_dir = workdir / "agent"
        self.record = workdir / "record.sqlite"
        self.outbox = self.agent_dir / "outbox.sqlite"
        self.procs: list[subprocess.Popen[bytes]] = []

    def prepare(self, broker: Broker) -> None:
        self.agent_dir.mkdir(parents=True, exist_ok=True)
        self.server_toml.write_text(
            "# written by battery-demo\n"
            '[store]\nurl = "sqlite:record.sqlite"\n'
            '[server]\nkey = "server.key"\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
            "[intake]\nbatch_ms = 20\n"
        )
        key = self.agent_dir / "device.key"
        if not key.exists():
            _cli("agent.cli", "keygen", "--out", str(key))
        enrolled = json.loads(_cli("server.cli", "devices", "list", "--json", "-c", str(self.server_toml)))
        if not any(d["device"] == DEVICE for d in enrolled):
            _cli(
                "server.cli",
                "devices",
                "enroll",
                DEVICE,
                "--role",
                "gateway",
                "--key",
                str(key.with_suffix(".pub")),
                "--org",
                "Demo Fleet Ltd",
                "-c",
                str(self.server_toml),
            )
        server_pub = _cli("server.cli", "pubkey", "-c", str(self.server_toml)).strip()
        (self.agent_dir / "agent.toml").write_text(
            "# written by battery-demo\n"
            f'[device]\nid = "{DEVICE}"\nkey = "device.key"\n'
            f'[server]\npublic_key = "{server_pub}"\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nresend_after_s = 5\n'
            '[outbox]\npath = "outbox.sqlite"\n'
            '[site]\nkind = "gateway"\nhealth_interval_s = 1.0\n'
            f'[observability]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[[slots]]\nslot = 1\ncode = "{CODE}"\n'
            f'[slots.serial]\nport = "{self.dir / "bms-slot1"}"\npoll_interval_s = 0.5\n'
        )

    def start(self, module: str, log: str, *args: str) -> None:
        with open(self.dir / log, "ab") as out:
            self.procs.append(subprocess.Popen(_python(module, *args), stdout=out, stderr=out))

    def figures(self) -> dict[str, int]:
        sealed = _count(self.outbox, "SELECT MAX(last_seq) FROM chain")
        waiting = _count(self.outbox, "SELECT COUNT(*) FROM outbox")
        return {
            "sealed": sealed,
            "receipted": sealed - waiting,
            "waiting": waiting,
            "stored": _count(self.record, "SELECT COUNT(*) FROM events"),
            "rejected": _count(self.record, "SELECT COUNT(*) FROM quarantine"),
        }

    def watch(self) -> None:
        tty = sys.stdout.isatty()
        started = time.monotonic()
        last_print = 0.0
        while (elapsed := time.monotonic() - started) < self.duration:
            for p in self.procs:
                if p.poll() is not None:
                    raise SystemExit(f"{p.args[2]} exited with {p.returncode}; see the logs in {self.dir}")
            f = self.figures()
            line = (
                f"[{elapsed:5.1f}/{self.duration:.0f}s] sealed {f['sealed']:>4}  receipted {f['receipted']:>4}  "
                f"waiting in outbox {f['waiting']:>3}  stored {f['stored']:>4}  rejected {f['rejected']:>3}"
            )
            if tty:
                print("\r" + line, end="", flush=True)
            elif elapsed - last_print >= 5:
                print(line, flush=True)
                last_print = elapsed
            time.sleep(0.25)
        if tty:
            print()

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()

    def summary(self) -> None:
        f = self.figures()
        print("\n== What happened ==")
        print(f"  agent   sealed {f['sealed']} signed health events into its outbox ({self.outbox})")
        print(f"          {f['receipted']} were covered by signed server receipts and pruned; {f['waiting']} wait")
        print(f"  server  stored {f['stored']} events in {self.record}; quarantined {f['rejected']}")
        print("\n== Devices (battery-server devices list) ==")
        print(_cli("server.cli", "devices", "list", "-c", str(self.server_toml)).rstrip())
        with sqlite3.connect(f"file:{self.record}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT envelope FROM events ORDER BY received_at DESC LIMIT 1").fetchone()
        if row is None:
            print("\nno event was stored; see the logs in", self.dir)
            return
        latest = self.dir / "latest-event.cose"
        latest.write_bytes(row[0])
        pub = self.agent_dir / "device.pub"
        print(
            f"\n== An auditor checks the latest stored event with only the device's public key ==\n"
            f"$ battery-server verify --key {pub} {latest}"
        )
        done = subprocess.run(
            _python("server.cli", "verify", "--key", str(pub), str(latest)), capture_output=True, text=True
        )
        print(done.stderr.strip())
        print(done.stdout.strip())
        print(f"\nLogs and data are in {self.dir}; run again to continue, or with --fresh to start clean.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="battery-demo",
        description="Run battery-trace end to end on this machine: a private broker, the server on SQLite, "
        "an emulated JBD BMS on a pty and the agent reading it.",
        epilog="examples:\n  battery-demo\n  battery-demo --duration 60 --fresh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds to run (default: %(default)s)")
    p.add_argument("--workdir", default="demo-data", help="where data and logs go (default: %(default)s)")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo data and start clean")
    args = p.parse_args(argv)
    if args.duration <= 0:
        p.error("--duration must be positive")
    workdir = Path(args.workdir).resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    state = "continuing with" if (workdir / "record.sqlite").exists() else "starting clean in"
    print(f"battery-trace demo: {state} {workdir} for {args.duration:.0f} s")
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        broker = Broker(workdir / "broker").start()
    except BrokerUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    demo = Demo(workdir, args.duration)
    link = PtyLink(workdir / "bms-slot1")
    bms = JbdBms(link, PackState(soc_pct=80))
    stop = threading.Event()
    try:
        demo.prepare(broker)
        print(f"  broker  mosquitto on {broker.host}:{broker.port} (private to this demo)")
        print(f"  BMS     emulated JBD on {link.path} -> pty")
        bms.start()
        threading.Thread(target=_drive, args=(bms, stop), daemon=True).start()
        demo.start("server.cli", "server.log", "run", "-c", str(demo.server_toml))
        demo.start("agent.cli", "agent.log", "run", "-c", str(demo.agent_dir / "agent.toml"))
        demo.watch()
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        stop.set()
        demo.stop()
        bms.stop()
        link.close()
        broker.stop()
    demo.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
