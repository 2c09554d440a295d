"""The agent's configuration: TOML, validated once at start-up into typed settings.

Every problem names the file, the key, the value and what would be valid, and the agent does not
start with a config it cannot fully understand. See configs/agent-gateway.toml for a commented example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.sources.serial_port import SerialSettings
from agent.uplink import MqttSettings
from protocol import battery_code, keys
from protocol.settings import ConfigError, Section, load_toml
from protocol.topics import device_id_problem

SITE_KINDS = ("gateway",)
SERIAL_PROTOCOLS = ("jbd",)
PARITIES = ("N", "E", "O")


@dataclass(frozen=True)
class SlotSettings:
    slot: int
    code: str | None
    serial: SerialSettings | None


@dataclass(frozen=True)
class AgentConfig:
    device: str
    key_path: Path
    server_key: keys.PublicKey
    mqtt: MqttSettings
    outbox_path: Path
    site_kind: str
    health_interval_s: float
    slots: tuple[SlotSettings, ...]


def _slot(s: Section) -> SlotSettings:
    slot = s.integer("slot", low=0, high=10_000)
    code = s.text("code", None)
    if code is not None:
        try:
            code = battery_code.parse(code).code
        except battery_code.CodeError as exc:
            raise s.error("code", f"is not a GB/T 34014 code: {exc}") from None
    serial = None
    if "serial" in s.data:
        p = s.section("serial")
        serial = SerialSettings(
            port=p.text("port"),
            protocol=p.text("protocol", "jbd", choices=SERIAL_PROTOCOLS),
            baud=p.integer("baud", 9600, low=300, high=4_000_000),
            parity=p.text("parity", "N", choices=PARITIES),
            timeout_s=p.number("timeout_s", 0.5, low=0.01, high=60),
            poll_interval_s=p.number("poll_interval_s", 1.0, low=0.05, high=3600),
        )
        p.finish()
    else:
        s.section("serial")  # marks the key as known for finish()
    s.finish()
    return SlotSettings(slot, code, serial)


def _mqtt(m: Section) -> MqttSettings:
    settings = MqttSettings(
        host=m.text("host", "127.0.0.1"),
        port=m.integer("port", 1883, low=1, high=65535),
        keepalive_s=m.integer("keepalive_s", 30, low=5, high=3600),
        resend_after_s=m.number("resend_after_s", 30.0, low=0.1, high=86400),
        session_expiry_s=m.integer("session_expiry_s", 7 * 24 * 3600, low=0, high=2**32 - 1),
        max_in_flight=m.integer("max_in_flight", 200, low=1, high=65535),
        tls_ca=_existing(m, "tls_ca"),
        tls_cert=_existing(m, "tls_cert"),
        tls_key=_existing(m, "tls_key"),
        username=m.text("username", None),
        password=m.text("password", None),
    )
    if (settings.tls_cert or settings.tls_key) and not settings.tls_ca:
        raise m.error("tls_ca", "is required when tls_cert or tls_key is set (TLS is all or nothing)")
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise m.error("tls_key", "tls_cert and tls_key go together (a client certificate and its key)")
    m.finish()
    return settings


def _existing(s: Section, key: str) -> str | None:
    path = s.path(key, None)
    if path is not None and not path.is_file():
        raise s.error(key, f"file {path} does not exist")
    return str(path) if path else None


def load(path: Path) -> AgentConfig:
    origin = str(path)
    root = Section.root(load_toml(path), origin, path.parent)
    d = root.section("device", required=True)
    device = d.text("id")
    problem = device_id_problem(device)
    if problem:
        raise d.error("id", problem)
    key_path = d.path("key")
    d.finish()

    srv = root.section("server", required=True)
    try:
        server_key = keys.load_public(srv.text("public_key"), base_dir=path.parent)
    except keys.InvalidKey as exc:
        raise srv.error("public_key", f"{exc}; give 64 hex characters or the path of a PEM file") from None
    srv.finish()

    mqtt = _mqtt(root.section("mqtt"))
    o = root.section("outbox")
    outbox_path = o.path("path", "outbox.sqlite")
    o.finish()

    site = root.section("site")
    site_kind = site.text("kind", "gateway", choices=SITE_KINDS)
    health_interval_s = site.number("health_interval_s", 60.0, low=0.1, high=86400)
    site.finish()

    slots = tuple(_slot(s) for s in root.sections("slots"))
    seen: set[int] = set()
    for i, slot in enumerate(slots):
        if slot.slot in seen:
            raise ConfigError(f"{origin}: [slots[{i}]] slot = {slot.slot}: is used twice; each slot number once")
        seen.add(slot.slot)
    root.finish()
    return AgentConfig(device, key_path, server_key, mqtt, outbox_path, site_kind, health_interval_s, slots)
