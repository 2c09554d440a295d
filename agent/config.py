"""The agent's configuration: TOML, validated once at start-up into typed settings.

Every problem names the file, the key, the value and what would be valid, and the agent does not
start with a config it cannot fully understand. Commented examples: configs/agent-gateway.toml,
configs/agent-swap-station.toml, configs/agent-maintenance-rig.toml, configs/agent-submitter.toml.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from battery_trace.agent.decoders import daly, dbc
from battery_trace.agent.decoders.dbc import HEALTH_FIELDS, CodeMapping, DbcError, DbcMapping
from battery_trace.agent.sources.can_bus import CanSettings
from battery_trace.agent.sources.serial_port import SerialSettings
from battery_trace.agent.uplink import MqttSettings
from battery_trace.protocol import battery_code, keys
from battery_trace.protocol.events import ROLES
from battery_trace.protocol.topics import device_id_problem

from battery_trace import tls
from battery_trace.settings import ConfigError, Section, load_toml

SITE_KINDS = ("gateway", "swap_station", "maintenance_rig", "submitter")
BMS_PROTOCOLS = ("jbd", "daly")
CAN_PROTOCOLS = ("gbt27930", "dbc")
PARITIES = ("N", "E", "O")


@dataclass(frozen=True)
class SlotSettings:
    slot: int
    code: str | None
    serial: SerialSettings | None
    can: CanSettings | None


@dataclass(frozen=True)
class LineDevice:
    """A scanner (for a slot), the swap station's PLC, or a rig's keypad."""

    kind: str  # scanner, plc or keypad
    slot: int
    serial: SerialSettings


@dataclass(frozen=True)
class AgentConfig:
    device: str
    role: str | None
    key_path: Path
    server_key: keys.PublicKey
    mqtt: MqttSettings
    outbox_path: Path
    outbox_budget_mb: float
    site_kind: str
    health_interval_s: float
    absent_after_s: float
    identity_wait_s: float
    slots: tuple[SlotSettings, ...]
    lines: tuple[LineDevice, ...]
    control: tuple[str, int] | None  # loopback host and port of /metrics, /healthz, /status
    status_interval_s: float
    control_secret: Path  # what `battery-agent confirm` must show POST /confirm
    plaintext_broker: bool  # a broker beyond this machine without TLS, allowed by [mqtt] allow_plaintext


def _serial(p: Section, protocols: tuple[str, ...], default: str) -> SerialSettings:
    settings = SerialSettings(
        port=p.text("port"),
        protocol=p.text("protocol", default, choices=protocols),
        baud=p.integer("baud", 9600, low=300, high=4_000_000),
        parity=p.text("parity", "N", choices=PARITIES),
        timeout_s=p.number("timeout_s", 0.5, low=0.01, high=60),
        poll_interval_s=p.number("poll_interval_s", 1.0, low=0.05, high=3600),
        charge_positive=p.boolean("charge_positive", True),
        address=p.integer("address", daly.HOST_ADDRESS, low=0, high=255),
    )
    p.finish()
    return settings


def _dbc_mapping(c: Section) -> DbcMapping:
    signals = c.section("signals")
    health = {}
    for name in list(signals.data):
        if name not in HEALTH_FIELDS:
            raise signals.error(name, f"is not a reading field; valid: {', '.join(HEALTH_FIELDS)}")
        ref = signals.text(name)
        if ref.count(".") != 1:
            raise signals.error(name, "must name a signal as Message.Signal")
        health[name] = ref
    signals.finish()
    code = None
    if "code" in c.data:
        cm = c.section("code")
        text = cm.text_list("text")
        code = CodeMapping(
            message=cm.text("message"),
            part=cm.text("part"),
            text=tuple(text),
            chars_per_signal=cm.integer("chars_per_signal", low=1, high=8),
            length=cm.integer("length", 24, low=1, high=64),
        )
        cm.finish()
    else:
        c.section("code")
    faults = c.text("faults", None)
    return DbcMapping(health, code, c.boolean("charge_positive", True), faults)


def _can(c: Section) -> CanSettings:
    protocol = c.text("protocol", "gbt27930", choices=CAN_PROTOCOLS)
    options: dict[str, Any] = dict(c.section("options").data)
    dbc_path = c.path("dbc", None)
    mapping = _dbc_mapping(c)
    if protocol == "dbc":
        if dbc_path is None:
            raise c.error("dbc", "is required when protocol = 'dbc' (the vendor's DBC file)")
        try:
            dbc.load(dbc_path, mapping)
        except DbcError as exc:
            raise c.error("dbc", str(exc)) from None
    settings = CanSettings(
        interface=c.text("interface"),
        channel=c.text("channel"),
        bitrate=c.integer("bitrate", 250_000, low=5_000, high=8_000_000),
        protocol=protocol,
        dbc=dbc_path,
        dbc_mapping=mapping,
        options=options,
    )
    c.finish()
    return settings


def _slot(s: Section) -> SlotSettings:
    slot = s.integer("slot", low=0, high=10_000)
    code = s.text("code", None)
    if code is not None:
        try:
            code = battery_code.parse(code).code
        except battery_code.CodeError as exc:
            raise s.error("code", f"is not a GB/T 34014 code: {exc}") from None
    serial = _serial(s.section("serial"), BMS_PROTOCOLS, "jbd") if "serial" in s.data else None
    can = _can(s.section("can")) if "can" in s.data else None
    for absent in ("serial", "can"):
        if absent not in s.data:
            s.section(absent)
    s.finish()
    return SlotSettings(slot, code, serial, can)


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mqtt(m: Section) -> tuple[MqttSettings, bool]:
    """The broker settings, and whether they reach beyond this machine in the clear (allowed only when
    ``allow_plaintext = true``: signatures keep events honest, but the password, device ids and battery
    codes would cross the network readable by anyone on the way)."""
    settings = MqttSettings(
        host=m.text("host", "127.0.0.1"),
        port=m.integer("port", 1883, low=1, high=65535),
        keepalive_s=m.integer("keepalive_s", 30, low=5, high=3600),
        resend_after_s=m.number("resend_after_s", 30.0, low=0.1, high=86400),
        session_expiry_s=m.integer("session_expiry_s", 7 * 24 * 3600, low=0, high=2**32 - 1),
        max_in_flight=m.integer("max_in_flight", 200, low=1, high=65535),
        tls=tls.load(m),
        username=m.text("username", None),
        password=m.text("password", None),
    )
    allow_plaintext = m.boolean("allow_plaintext", False)
    plaintext = settings.tls is None and not _is_loopback(settings.host)
    if plaintext and not allow_plaintext:
        raise m.error(
            "host",
            "is not this machine and no TLS is configured: set tls_ca (and a client certificate) to reach it, "
            "or allow_plaintext = true to send in the clear on a network you trust",
        )
    m.finish()
    return settings, plaintext


def _listen(o: Section) -> tuple[str, int] | None:
    text = o.text("listen", "127.0.0.1:9108")
    if text == "off":
        return None
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not _is_loopback(host) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise o.error("listen", "must be a loopback address and port, e.g. 127.0.0.1:9108 (or 'off')")
    return host, int(port)


def _one_owner_each(origin: str, slots: tuple[SlotSettings, ...], lines: list[LineDevice]) -> None:
    """A serial port or a CAN bus serves one slot or device: shared, two sources would each read part of
    its traffic (or all of it, twice) and report it under their own slot, both looking connected."""
    owners: dict[tuple[str, ...], str] = {}

    def claim(resource: tuple[str, ...], owner: str, what: str) -> None:
        if resource in owners:
            raise ConfigError(
                f"{origin}: {owner}: {what} is also used by {owners[resource]}; each port or bus serves one "
                "slot or device (a second slot needs its own adapter)"
            )
        owners[resource] = owner

    for s in slots:
        if s.serial:
            claim(("port", str(s.serial.port)), f"[slots] slot = {s.slot} [serial]", f"port {s.serial.port!r}")
        if s.can:
            bus = (s.can.interface, str(s.can.channel))
            what = f"{s.can.interface} channel {s.can.channel!r}"
            claim(("can", *bus), f"[slots] slot = {s.slot} [can]", what)
            if s.can.interface in ("slcan", "serial", "seeedstudio", "robotell"):  # a serial device underneath
                claim(("port", str(s.can.channel)), f"[slots] slot = {s.slot} [can]", what)
    for line in lines:
        owner = f"[[scanners]] slot = {line.slot}" if line.kind == "scanner" else f"[{line.kind}]"
        claim(("port", str(line.serial.port)), owner, f"port {line.serial.port!r}")


def load(path: Path) -> AgentConfig:
    origin = str(path)
    root = Section.root(load_toml(path), origin, path.parent)
    d = root.section("device", required=True)
    device = d.text("id")
    problem = device_id_problem(device)
    if problem:
        raise d.error("id", problem)
    role = d.text("role", None, choices=ROLES)
    key_path = d.path("key")
    d.finish()

    srv = root.section("server", required=True)
    try:
        server_key = keys.load_public(srv.text("public_key"), base_dir=path.parent)
    except keys.InvalidKey as exc:
        raise srv.error("public_key", f"{exc}; give 64 hex characters or the path of a PEM file") from None
    srv.finish()

    mqtt, plaintext_broker = _mqtt(root.section("mqtt"))
    o = root.section("outbox")
    outbox_path = o.path("path", "outbox.sqlite")
    budget = o.number("budget_mb", 1024.0, low=1.0, high=1_000_000)
    o.finish()

    site = root.section("site")
    site_kind = site.text("kind", "gateway", choices=SITE_KINDS)
    health_interval_s = site.number("health_interval_s", 60.0, low=0.1, high=86400)
    absent_after_s = site.number("absent_after_s", 30.0, low=0.5, high=86400)
    identity_wait_s = site.number("identity_wait_s", 60.0, low=0.0, high=86400)
    status_interval_s = site.number("status_interval_s", 30.0, low=0.5, high=86400)
    site.finish()

    slots = tuple(_slot(s) for s in root.sections("slots"))
    seen: set[int] = set()
    for i, slot in enumerate(slots):
        if slot.slot in seen:
            raise ConfigError(f"{origin}: [slots[{i}]] slot = {slot.slot}: is used twice; each slot number once")
        seen.add(slot.slot)

    lines: list[LineDevice] = []
    scanned: set[int] = set()
    for s in root.sections("scanners"):
        slot = s.integer("slot", 0, low=0, high=10_000)
        if slot not in seen:
            valid = ", ".join(map(str, sorted(seen))) or "none configured"
            raise s.error("slot", f"= {slot}: no [[slots]] has this number (slots: {valid}); a scanner reads one slot")
        if slot in scanned:
            raise s.error("slot", f"= {slot}: another [[scanners]] reads this slot already; one scanner per slot")
        scanned.add(slot)
        lines.append(LineDevice("scanner", slot, _serial(s, ("scanner",), "scanner")))
    for kind in ("plc", "keypad"):
        if kind in root.data:
            lines.append(LineDevice(kind, 0, _serial(root.section(kind), (kind,), kind)))
        else:
            root.section(kind)
    _one_owner_each(origin, slots, lines)
    if site_kind != "swap_station" and "plc" in root.data:
        raise root.error("plc", "a PLC drives swaps; it belongs to site kind 'swap_station'")
    observability = root.section("observability")
    control = _listen(observability)
    control_secret = observability.path("secret_file", str(outbox_path.with_suffix(".control-secret")))
    observability.finish()
    root.finish()
    return AgentConfig(
        device=device,
        role=role,
        key_path=key_path,
        server_key=server_key,
        mqtt=mqtt,
        outbox_path=outbox_path,
        outbox_budget_mb=budget,
        site_kind=site_kind,
        health_interval_s=health_interval_s,
        absent_after_s=absent_after_s,
        identity_wait_s=identity_wait_s,
        slots=slots,
        lines=tuple(lines),
        control=control,
        status_interval_s=status_interval_s,
        control_secret=control_secret,
        plaintext_broker=plaintext_broker,
    )
