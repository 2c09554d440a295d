"""The server's configuration: TOML validated once into typed settings, with embedded defaults.

Without a config file the server uses a home folder (``$BT_HOME``, else
``$XDG_DATA_HOME/battery-trace``, else ``~/.local/share/battery-trace``) holding the SQLite record and
the server's signing key, so a first user can enrol a device right after installing.
See configs/server.toml for a commented example.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from battery_trace.protocol.events import EVENT_TYPES
from battery_trace.server.intake import IntakeSettings
from battery_trace.server.rules import DEFAULT_DEADLINES_DAYS
from battery_trace.server.store import RuleSettings

from battery_trace import tls
from battery_trace.settings import ConfigError, Section, load_toml


@dataclass(frozen=True)
class WebSettings:
    listen: tuple[str, int] | None  # None: no dashboard, /metrics or /healthz
    token_path: Path  # the dashboard's access token; created (0600) on first start


@dataclass(frozen=True)
class ServerConfig:
    store_url: str
    key_path: Path
    intake: IntakeSettings
    rules: RuleSettings
    web: WebSettings


def home() -> Path:
    if os.environ.get("BT_HOME"):
        return Path(os.environ["BT_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "battery-trace"


def defaults() -> ServerConfig:
    base = home()
    web = WebSettings(("127.0.0.1", 8080), base / "web.token")
    return ServerConfig(f"sqlite:{base / 'record.sqlite'}", base / "server.key", IntakeSettings(), RuleSettings(), web)


def load(path: Path | None) -> ServerConfig:
    if path is None:
        return defaults()
    base = defaults()
    root = Section.root(load_toml(path), str(path), path.parent)
    st = root.section("store")
    url = st.text("url", base.store_url)
    if url.startswith("sqlite:") and not url.startswith("sqlite:/"):
        url = f"sqlite:{(path.parent / url.removeprefix('sqlite:')).resolve()}"  # relative to the config file
    elif not url.startswith(("sqlite:", "postgresql://", "postgres://")):
        raise st.error("url", "is not a store URL; valid: sqlite:PATH or postgresql://USER@HOST:PORT/DB")
    st.finish()
    srv = root.section("server")
    key_path = srv.path("key", str(base.key_path))
    srv.finish()
    m = root.section("mqtt")
    i = root.section("intake")
    d = IntakeSettings()
    intake = IntakeSettings(
        host=m.text("host", d.host),
        port=m.integer("port", d.port, low=1, high=65535),
        client_id=m.text("client_id", d.client_id),
        session_expiry_s=m.integer("session_expiry_s", d.session_expiry_s, low=0, high=2**32 - 1),
        max_message_bytes=i.integer("max_message_bytes", d.max_message_bytes, low=256, high=16 * 1024 * 1024),
        batch_max=i.integer("batch_max", d.batch_max, low=1, high=100_000),
        batch_ms=i.number("batch_ms", d.batch_ms, low=0.0, high=60_000),
        receive_max=i.integer("receive_max", d.receive_max, low=1, high=65535),
        sweep_interval_s=i.number("sweep_interval_s", d.sweep_interval_s, low=1.0, high=86400),
        tls=tls.load(m),
    )
    m.finish()
    i.finish()
    r = root.section("rules")
    dl = r.section("deadlines_days")
    deadlines = dict(DEFAULT_DEADLINES_DAYS)
    for name in list(dl.data):
        if name not in EVENT_TYPES:
            raise ConfigError(
                f"{path}: [rules.deadlines_days] {name}: is not an event type; valid: {', '.join(EVENT_TYPES)}"
            )
        deadlines[name] = dl.number(name, low=0.0, high=3650)
    dl.finish()
    rule_settings = RuleSettings(
        deadlines_days=deadlines,
        unaccounted_days=r.number("unaccounted_days", 30.0, low=0.0, high=3650),
        gap_minutes=r.number("gap_minutes", 60.0, low=0.0, high=525600),
    )
    r.finish()
    w = root.section("web")
    listen = _listen(w, "listen", "127.0.0.1:8080")
    token_path = w.path("token_file", str(key_path.parent / "web.token"))
    w.finish()
    root.finish()
    return ServerConfig(url, key_path, intake, rule_settings, WebSettings(listen, token_path))


def _listen(s: Section, key: str, default: str) -> tuple[str, int] | None:
    text = s.text(key, default)
    if text == "off":
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise s.error(key, "must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080 (or 'off')")
    return host.strip("[]"), int(port)
