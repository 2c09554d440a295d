"""A small world of enrolled devices that seal real events, for tests of the record and its rules.

Every event goes the real way: sealed with the device's key, parsed and checked by the server's
verification, committed through the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from battery_trace.protocol import envelope, events, keys
from battery_trace.server import verify
from battery_trace.server.records import Accepted, Rejected
from battery_trace.server.store import CommitResult, Store

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY = 86_400_000


@dataclass
class Device:
    name: str
    role: str
    key: keys.PrivateKey
    seq: int = 0
    prev: bytes = events.ZERO_HASH
    sent: list[bytes] = field(default_factory=list)

    def seal(self, event_type: str, fields: dict, time_ms: int, source: str = "label") -> bytes:
        self.seq += 1
        ev = events.Event(self.name, self.seq, self.prev, time_ms, event_type, source, fields)
        raw = envelope.sign(events.encode(ev), self.key)
        self.prev = envelope.envelope_hash(raw)
        self.sent.append(raw)
        return raw


class World:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.devices: dict[str, Device] = {}

    def device(self, name: str, role: str) -> Device:
        d = Device(name, role, keys.generate())
        self.store.enroll(name, role, d.key.public, f"{role} Co", (T0 - 10 * DAY) / 1000)
        self.devices[name] = d
        return d

    def check(self, device: Device, raw: bytes, received_ms: int) -> Accepted | Rejected:
        parsed = verify.parse(f"bt/v1/{device.name}/events", raw, 65536)
        if isinstance(parsed, Rejected):
            return parsed
        return verify.check(parsed, self.store.key(parsed.kid), received_ms / 1000)

    def send(self, device: Device, event_type: str, fields: dict, time_ms: int, delay_ms: int = 60_000) -> CommitResult:
        """Seal, verify and commit one event that arrives ``delay_ms`` after it happened."""
        raw = device.seal(event_type, fields, time_ms)
        return self.deliver(device, raw, time_ms + delay_ms)

    def deliver(self, device: Device, raw: bytes, received_ms: int) -> CommitResult:
        outcome = self.check(device, raw, received_ms)
        if isinstance(outcome, Accepted):
            return self.store.commit([outcome], [], received_ms / 1000)
        return self.store.commit([], [outcome], received_ms / 1000)

    def open_findings(self, kind: str | None = None) -> list[tuple[str, str]]:
        return sorted((f["kind"], f["subject"]) for f in self.store.findings(open_only=True, kind=kind))
