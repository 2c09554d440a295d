"""Wires the agent's stages together and runs them in one asyncio process."""

from __future__ import annotations

import asyncio
import logging
import signal

from agent import battery_view
from agent.config import AgentConfig
from agent.outbox import Outbox
from agent.sealer import Draft, Sealer
from agent.sources.serial_port import serial_source
from agent.uplink import Uplink
from agent.workflows import gateway
from protocol import keys

log = logging.getLogger(__name__)


async def run(config: AgentConfig) -> None:
    key = keys.load_private(config.key_path)
    outbox = Outbox(config.outbox_path)
    sealer = Sealer(outbox, key, config.device)
    uplink = Uplink(config.mqtt, outbox, config.device, key.public.kid, config.server_key)
    view = battery_view.BatteryView()
    for slot in config.slots:
        if slot.code:
            view.set_code(slot.slot, slot.code, "label")

    def seal(draft: Draft) -> int:
        seq = sealer.seal(draft)
        uplink.notify()
        return seq

    pollers = [serial_source(s.slot, s.serial, view.update) for s in config.slots if s.serial]
    log.info(
        "agent %s (key %s) starting: %d slots, outbox %s holds %d unreceipted events",
        config.device,
        key.public.kid.hex(),
        len(config.slots),
        config.outbox_path,
        outbox.depth()[0],
    )
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel if main else (lambda: None))
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(uplink.run())
            group.create_task(gateway.run(view, seal, config.health_interval_s))
            for poller in pollers:
                group.create_task(poller.run())
    except asyncio.CancelledError:
        log.info("stopping; %d sealed events wait in the outbox", outbox.depth()[0])
    finally:
        outbox.close()
