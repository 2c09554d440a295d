"""The demo's sites: each is a real `battery-agent` with real transports and emulated devices.

Devices get their keys with `battery-agent keygen` and are enrolled with `battery-server devices
enroll`, the way an operator does it; agents run as `battery-agent run`, submitters use `battery-agent
emit`. Only the hardware is emulated (firmware_stubs), on ptys and slcan adapters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.can_slot import CanSlot
from battery_trace.firmware_stubs.daly_bms import DalyBms, DalyPack
from battery_trace.firmware_stubs.jbd_bms import JbdBms, PackState
from battery_trace.firmware_stubs.line_device import LineDevice
from battery_trace.firmware_stubs.pty_link import PtyLink

from harness import agents
from harness.broker import Broker


def cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr}")
    return done


@dataclass
class Site:
    name: str
    role: str
    kind: str
    dir: Path
    config: Path | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    closers: list[Any] = field(default_factory=list)

    @property
    def key(self) -> Path:
        return self.dir / "device.key"

    def prepare(self, server_toml: Path) -> None:
        """Key (once) and enrolment (once), as an operator would."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            cli("battery_trace.agent.cli", "keygen", "--out", str(self.key), "--json")
        listed = json.loads(cli("battery_trace.server.cli", "devices", "list", "--json", "-c", str(server_toml)).stdout)
        if not any(d["device"] == self.name for d in listed):
            cli(
                "battery_trace.server.cli",
                "devices",
                "enroll",
                self.name,
                "--role",
                self.role,
                "--key",
                str(self.key.with_suffix(".pub")),
                "--org",
                f"Demo {self.role.replace('_', ' ')}",
                "-c",
                str(server_toml),
            )

    def write(self, server_hex: str, broker: Broker, body: str = "", **kw: Any) -> None:
        self.config, self.port = agents.write_config(
            self.dir / "agent.toml", self.name, self.key, server_hex, broker, self.kind, body, role=self.role, **kw
        )

    def start(self) -> None:
        assert self.config is not None
        self.process = agents.start(self.config, self.dir / "agent.log")

    def status(self) -> dict[str, Any]:
        return agents.status(self.port) or {}

    def stop(self) -> None:
        if self.process is not None:
            agents.stop(self.process)
        for closer in self.closers:
            closer()


class SwapStation(Site):
    """Two or more charging slots on slcan adapters, a label scanner per slot, and the PLC."""

    def build(self, slots: int) -> None:
        self.slots = {n: CanSlot(self.dir / f"can-slot{n}") for n in range(1, slots + 1)}
        self.scanners = {n: LineDevice(PtyLink(self.dir / f"scanner-slot{n}")) for n in self.slots}
        self.plc = LineDevice(PtyLink(self.dir / "plc"), ending=b"\n")
        self.closers += [s.close for s in self.slots.values()]
        self.closers += [s.link.close for s in self.scanners.values()] + [self.plc.link.close]

    def body(self) -> str:
        text = "".join(
            f'[[slots]]\nslot = {n}\n[slots.can]\ninterface = "slcan"\nchannel = "{s.path}"\nbitrate = 250000\n'
            f'protocol = "gbt27930"\n[slots.can.options]\nsleep_after_open = 0\n'
            for n, s in self.slots.items()
        )
        text += "".join(f'[[scanners]]\nslot = {n}\nport = "{d.link.path}"\n' for n, d in self.scanners.items())
        return text + f'[plc]\nport = "{self.plc.link.path}"\n'

    def put(self, slot: int, code: str, pack: gbt27930_bms.Pack) -> None:
        """A battery goes into a slot: its BMS starts talking and its label is scanned there."""
        self.slots[slot].insert(pack)
        self.scanners[slot].send(code)


class Rig(Site):
    """A maintenance rig with a Daly BMS that reports its own code."""

    def build(self, code: str) -> None:
        link = PtyLink(self.dir / "daly")
        self.pack = DalyPack(
            code=code, voltage_v=351.2, current_a=0.0, soc_pct=21.5, cycles=256, cells_mv=[3301, 3298, 3262, 3305, 3300]
        )
        self.bms = DalyBms(link, self.pack)
        self.closers += [self.bms.stop, link.close]
        self.daly_path = link.path

    def connect_pack(self) -> None:
        """The technician plugs the pack into the rig: its BMS starts answering."""
        self.bms.start()

    def disconnect_pack(self) -> None:
        self.bms.stop()

    def body(self) -> str:
        return (
            f'[[slots]]\nslot = 1\n[slots.serial]\nport = "{self.daly_path}"\nprotocol = "daly"\n'
            "poll_interval_s = 0.5\n"
        )

    def confirm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli("battery_trace.agent.cli", "confirm", *args, "-c", str(self.config), check=False)


class Gateway(Site):
    """A BMS gateway in a vehicle, reading a JBD BMS."""

    def build(self, code: str) -> None:
        link = PtyLink(self.dir / "jbd")
        self.bms = JbdBms(link, PackState(soc_pct=71))
        self.bms.start()
        self.closers += [self.bms.stop, link.close]
        self.code, self.jbd_path = code, link.path

    def body(self) -> str:
        return (
            f'[[slots]]\nslot = 1\ncode = "{self.code}"\n[slots.serial]\nport = "{self.jbd_path}"\n'
            'protocol = "jbd"\npoll_interval_s = 0.5\n'
        )


class Submitter(Site):
    """A manufacturer, vehicle maker, scrapper or recycler: events from files, with `battery-agent emit`."""

    def emit_file(self, name: str, lines: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        path = self.dir / name
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return cli(
            "battery_trace.agent.cli",
            "emit",
            "--file",
            str(path),
            "-c",
            str(self.config),
            "--timeout",
            "30",
            check=False,
        )
