"""Wires the agent's stages together and runs them in one asyncio process.

sources -> (decoders inside them) -> battery view -> workflow -> sealer -> outbox -> uplink, plus the
local endpoint (/metrics, /healthz, /status, /confirm) and the retained status the uplink publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import Counter
from typing import Any

from battery_trace.agent import metrics
from battery_trace.agent.battery_view import BatteryView, SlotState
from battery_trace.agent.config import AgentConfig
from battery_trace.agent.control import ControlServer, create_secret
from battery_trace.agent.decoders.station import StationCommand, parse
from battery_trace.agent.identity import Bindings
from battery_trace.agent.outbox import Outbox
from battery_trace.agent.readings import DecodeError
from battery_trace.agent.sealer import Draft, Held, Refused, Sealer
from battery_trace.agent.sources.can_bus import CanSource
from battery_trace.agent.sources.serial_port import serial_source
from battery_trace.agent.uplink import Uplink
from battery_trace.agent.workflows.gateway import Gateway
from battery_trace.agent.workflows.maintenance_rig import MaintenanceRig, RigError
from battery_trace.agent.workflows.swap_station import ALARM_WINDOW_S, SwapStation
from battery_trace.protocol import envelope, events, keys

log = logging.getLogger(__name__)


class Agent:
    """One site's agent: everything it runs, and what it can tell about itself."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.key = keys.load_private(config.key_path)
        self.outbox = Outbox(config.outbox_path)
        self.bindings = Bindings(config.outbox_path)
        self.sealer = Sealer(
            self.outbox, self.key, config.device, config.role, int(config.outbox_budget_mb * 1e6), hold=True
        )
        self.uplink = Uplink(config.mqtt, self.outbox, config.device, self.key.public.kid, config.server_key)
        self.uplink.extra_status = self.status_summary
        self.view = BatteryView(self.bindings, config.absent_after_s)
        self.slot_changes: Counter[str] = Counter()
        self.view.listeners.append(self._slot_changed)
        for slot in config.slots:
            if slot.code:
                self.view.set_code(slot.slot, slot.code, "label")
        kind = config.site_kind
        self.workflow: Gateway | None
        if kind == "swap_station":
            self.workflow = self._swap_station(config)
        elif kind == "maintenance_rig":
            self.workflow = MaintenanceRig(self.view, self.seal, config.health_interval_s, _first_slot(config))
        elif kind == "gateway":
            self.workflow = Gateway(self.view, self.seal, config.health_interval_s)
        else:
            self.workflow = None  # a submitter: events come from `battery-agent emit`
        self.sources: list[Any] = []
        for s in config.slots:
            if s.serial:
                self.sources.append(serial_source(s.slot, s.serial, self.reading))
            if s.can:
                self.sources.append(CanSource(s.slot, s.can, self.reading))
        for line in config.lines:
            self.sources.append(serial_source(line.slot, line.serial, self.reading))
        self.started = time.monotonic()
        self.decode_errors = 0
        self.tick_errors = 0
        # Only a rig takes confirmations, so only a rig needs the secret that guards them.
        self.control_secret = create_secret(config.control_secret) if kind == "maintenance_rig" else None
        self.control: ControlServer | None = None

    def _swap_station(self, config: AgentConfig) -> SwapStation:
        """The station's workflow, its bay resumed from the outbox database (it survives a restart)."""
        station = SwapStation(
            self.view,
            self.seal,
            config.health_interval_s,
            config.identity_wait_s,
            slots=[s.slot for s in config.slots],
            store=self.outbox,
            still_held=lambda draft: draft in self.sealer.held,
        )
        since = time.time() - ALARM_WINDOW_S
        station.restore(self.outbox.load_bay(), self._sealed_swaps(), self.outbox.evidence_since(since))
        return station

    def _sealed_swaps(self) -> set[tuple[str, int]]:
        """(VIN, time) of the swaps in the outbox. Nothing is published between a seal and the bay's save
        that follows it, so a swap sealed just before a crash is still here when the agent starts again."""
        sealed = set()
        for raw in self.outbox.unreceipted_of_type("swapped"):
            event = events.decode(envelope.decode(raw).payload)
            sealed.add((event.fields.get("vin"), event.time_ms))
        return sealed

    def _slot_changed(self, what: str, slot: int, state: SlotState) -> None:
        self.slot_changes[what] += 1
        log.info("slot %s: battery %s (%s)", slot, what, state.code or state.secondary or "not identified yet")

    def seal(self, draft: Draft) -> int:
        seq = self.sealer.seal(draft)
        self.uplink.notify()
        return seq

    def reading(self, slot: int, reading: Any) -> None:
        if isinstance(reading, StationCommand):
            if isinstance(self.workflow, SwapStation):
                self.workflow.command(reading)
            elif isinstance(self.workflow, MaintenanceRig):
                with contextlib.suppress(RigError, Refused, Held):  # logged where they happen
                    self.workflow.command(reading)
            return
        self.view.update(slot, reading)

    def confirm(self, request: dict[str, Any]) -> dict[str, Any]:
        """A technician's confirmation from `battery-agent confirm` (POST /confirm)."""
        if not isinstance(self.workflow, MaintenanceRig):
            raise ValueError(f"this agent is a {self.config.site_kind}; confirmations are for maintenance rigs")
        line = str(request.get("line", ""))
        command = parse(line)
        if isinstance(command, DecodeError):
            raise ValueError(str(command))
        try:
            seq = self.workflow.command(command)
        except (RigError, Refused) as exc:
            raise ValueError(str(exc)) from None
        except Held as exc:  # taken, and kept until the outbox can be written: confirming again would be twice
            return {"sealed": None, "held": str(exc)}
        return {"sealed": seq}

    def alarms(self) -> list[str]:
        """What an operator must act on: the outbox's (budget, full disk), the uplink's (a receipt
        that told of another chain under this device's key), the bindings' (a BMS identity that is
        not unique) and the swap station's (a swap that was not sealed as a whole)."""
        alarms = (self.sealer.alarm, self.uplink.alarm, self.bindings.alarm, self.swap_alarm)
        return [alarm for alarm in alarms if alarm]

    @property
    def swap_alarm(self) -> str | None:
        return self.workflow.alarm if isinstance(self.workflow, SwapStation) else None

    def status_summary(self) -> dict[str, Any]:
        return {
            "alarm": "; ".join(self.alarms()) or None,
            "held": len(self.sealer.held),
            "sources_down": sum(not s.connected for s in self.sources),
            "sources_silent": len(self.silent_sources()),  # open, yet no reading for absent_after_s
        }

    def status(self) -> dict[str, Any]:
        depth, oldest = self.outbox.depth()
        return {
            "device": self.config.device,
            "site": self.config.site_kind,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "outbox": {
                "depth": depth,
                "oldest_unreceipted_s": round(time.time() - oldest, 1) if oldest else 0.0,
                "head_seq": self.outbox.head(self.key.public.kid),
                "bytes": self.outbox.size_bytes(),
                "alarm": self.sealer.alarm,
                "held": len(self.sealer.held),
            },
            "uplink": {"connected": self.uplink.connected, "alarm": self.uplink.alarm, **self.uplink.counters},
            "sealer": {"sealed": self.sealer.sealed, "refused": dict(self.sealer.refused)},
            "slots": {str(n): s.snapshot() for n, s in sorted(self.view.slots.items())},
            "sources": [
                {
                    "slot": s.slot,
                    "name": s.name,
                    "connected": s.connected,
                    "last_frame_at": s.last_frame_at,
                    "silent_s": round(s.silence.seconds(), 1),
                    "counters": dict(s.counters),
                    "decode_errors": dict(s.decode_errors()),
                }
                for s in self.sources
            ],
            "bindings": dict(self.bindings.counters),
            "readings": dict(self.view.counters),
            "slot_changes": dict(self.slot_changes),
            "workflow": dict(getattr(self.workflow, "counters", {})),
            **(
                {"bay": {**self.workflow.bay(), "alarm": self.swap_alarm}}
                if isinstance(self.workflow, SwapStation)
                else {}
            ),
        }

    def healthy(self) -> tuple[bool, str]:
        problems = []
        if not self.uplink.connected:
            problems.append("broker not connected")
        down = [s.name for s in self.sources if not s.connected]
        if down:
            problems.append(f"sources down: {', '.join(down)}")
        silent = self.silent_sources()
        if silent:
            problems.append(f"sources silent: {'; '.join(silent)}")
        problems.extend(self.alarms())
        return (not problems, "; ".join(problems) or "ok")

    def silent_sources(self) -> list[str]:
        """Open sources that should be talking (a CAN bus, a polled BMS) and have given no reading for
        longer than a slot takes to count as empty: a dead adapter, a hung BMS, a bus of frames that
        do not decode, or an empty slot. The agent cannot tell these apart; a person can."""
        return [
            f"{s.name} (slot {s.slot}) for {s.silence.seconds():.0f} s, {s.silence.describe()}"
            for s in self.sources
            if s.connected and s.expects_traffic and s.silence.seconds() > self.config.absent_after_s
        ]

    async def _tick(self) -> None:
        # At least as often as snapshots are due: a health interval under a second must not be
        # stretched to the tick.
        period = min(1.0, self.config.health_interval_s)
        while True:
            await asyncio.sleep(period)
            try:
                self._tick_once(time.monotonic())  # durations only: a stepped wall clock must not matter
            except Exception:  # an unattended station must outlive one bad tick; it is logged and counted
                self.tick_errors += 1
                log.exception("a periodic tick failed; the agent goes on")

    def _tick_once(self, now: float) -> None:
        if self.sealer.retry():
            self.uplink.notify()
        self.view.expire(now)
        if self.workflow is not None:
            self.workflow.tick(now)

    async def run(self) -> None:
        log.info(
            "agent %s (%s, key %s) starting: %d sources, outbox %s holds %d unreceipted events",
            self.config.device,
            self.config.site_kind,
            self.key.public.kid.hex(),
            len(self.sources),
            self.config.outbox_path,
            self.outbox.depth()[0],
        )
        if self.config.plaintext_broker:
            log.warning(
                "BROKER %s:%d IS REACHED IN THE CLEAR (no TLS; [mqtt] allow_plaintext = true): anyone on the "
                "network sees this device's events, codes and password; configure tls_ca",
                self.config.mqtt.host,
                self.config.mqtt.port,
            )
        control = None
        if self.config.control:
            host, port = self.config.control
            control = ControlServer(
                host,
                port,
                lambda: metrics.render(self),
                self.status,
                self.healthy,
                self.confirm,
                self.control_secret,
            )
            try:
                await control.start()
            except OSError as exc:  # a busy port must not stop the agent from delivering events
                log.error("no /metrics, /status or /confirm: cannot listen on %s:%d (%s)", host, port, exc.strerror)
                control = None
        self.control = control
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.uplink.run(self.config.status_interval_s))
                group.create_task(self._tick())
                for source in self.sources:
                    group.create_task(source.run())
        finally:
            if control:
                await control.close()
            log.info("stopping; %d sealed events wait in the outbox", self.outbox.depth()[0])
            self.outbox.close()
            self.bindings.close()


def _first_slot(config: AgentConfig) -> int:
    return config.slots[0].slot if config.slots else 1


STOP_GRACE_S = 10.0


def _force_exit() -> None:
    """A stop that did not finish in time: say what was still running, then leave. Safe, because every
    sealed event is already committed to the outbox; only in-flight publishing is cut short."""
    for task in asyncio.all_tasks():
        where = "; ".join(f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack(limit=8))
        log.error("still running at stop: %s at %s", task.get_name(), where)
    log.error("stop took longer than %.0f s; exiting anyway (the outbox is consistent)", STOP_GRACE_S)
    logging.shutdown()
    os._exit(0)


async def run(config: AgentConfig) -> None:
    agent = Agent(config)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if main is not None:
            main.cancel()
        loop.call_later(STOP_GRACE_S, _force_exit)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    with contextlib.suppress(asyncio.CancelledError):
        await agent.run()
