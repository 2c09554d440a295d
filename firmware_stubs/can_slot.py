"""A charging slot's CAN bus as the agent meets it: an slcan USB-CAN adapter on a pty, and a GB/T 27930
BMS (with its charger) that can be put into the slot and taken out again."""

from __future__ import annotations

from pathlib import Path

from battery_trace.firmware_stubs import gbt27930_bms
from battery_trace.firmware_stubs.pty_link import PtyLink
from battery_trace.firmware_stubs.slcan_adapter import Player, SlcanAdapter, gbt27930_frames


class CanSlot:
    def __init__(self, path: Path, interval_s: float = 0.002) -> None:
        self.path = path
        self.link = PtyLink(path)
        self.adapter = SlcanAdapter(self.link)
        self.adapter.start()
        self.interval_s = interval_s
        self.player: Player | None = None
        self.pack: gbt27930_bms.Pack | None = None

    def insert(self, pack: gbt27930_bms.Pack, handshake_once: bool = False) -> None:
        """A battery goes into the slot: its BMS starts a charging session, and repeats it. With
        ``handshake_once`` it behaves as a real one: BRM (its identity) only in the one handshake, then
        charging frames for as long as it stays."""
        self.remove()
        self.pack = pack
        self.player = Player(self.adapter, self.interval_s)
        if not handshake_once:
            self.player.start_loop(lambda: gbt27930_frames(pack, rounds=3), pause_s=0.2)
            return
        sessions = iter(range(1 << 62))

        def frames() -> list[tuple[int, bytes]]:
            first = next(sessions) == 0
            out = [*gbt27930_bms.handshake(pack)] if first else []
            return [(f.arbitration_id, f.data) for f in out + gbt27930_bms.charging(pack, 3)]

        self.player.start_loop(frames, pause_s=0.2)

    def remove(self) -> gbt27930_bms.Pack | None:
        pack, self.pack = self.pack, None
        if self.player:
            self.player.stop()
            self.player = None
        return pack

    def close(self) -> None:
        self.remove()
        self.adapter.stop()
        self.link.close()
