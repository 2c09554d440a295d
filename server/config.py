"""The server's configuration: TOML validated once into typed settings, with embedded defaults.

Without a config file the server uses a home folder (``$BT_HOME``, else
``$XDG_DATA_HOME/battery-trace``, else ``~/.local/share/battery-trace``) holding the SQLite record and
the server's signing key (``battery-server init`` creates it), so a first user can enrol a device
right after installing. See configs/server.toml for a commented example.

Secrets need not sit in the config file: ``BT_STORE_URL`` (the whole store URL, password included)
overrides ``[store] url``, ``[store] password_file`` adds a PostgreSQL password from a file, and
``BT_WEB_TOKEN`` overrides ``[web] token_file``. A store URL is only ever shown redacted.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from battery_trace.protocol.events import EVENT_TYPES
from battery_trace.server.intake import IntakeSettings
from battery_trace.server.rules import DEFAULT_DEADLINES_DAYS
from battery_trace.server.store import QuarantineLimits, RuleSettings

from battery_trace import tls
from battery_trace.bounded_read import UnreadableInput, read_bounded
from battery_trace.settings import ConfigError, Section, load_toml

STORE_URL_ENV = "BT_STORE_URL"
TOKEN_ENV = "BT_WEB_TOKEN"
POSTGRES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class WebSettings:
    listen: tuple[str, int] | None  # None: no dashboard, /metrics or /healthz
    token_path: Path  # the dashboard's access token (unless $BT_WEB_TOKEN); created by `battery-server init`
    max_connections: int = 200  # open HTTP connections at once; also kept below the process's descriptor limit
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its headers


@dataclass(frozen=True)
class ServerConfig:
    store_url: str  # may hold a password: show ``store_shown``, never this
    key_path: Path
    intake: IntakeSettings
    rules: RuleSettings
    web: WebSettings
    quarantine: QuarantineLimits = field(default_factory=QuarantineLimits)
    next_key_path: Path | None = None  # while the server's key is rotated: the key it signs with next
    crl_path: Path | None = None  # the broker's CRL, watched so that its expiry is heard in time

    @property
    def store_shown(self) -> str:
        return redact(self.store_url)


def redact(url: str) -> str:
    """A store URL fit for a log line or an error message: its password, if any, replaced by ***."""
    if not url.startswith(POSTGRES):
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{hostinfo}"))


def home() -> Path:
    if os.environ.get("BT_HOME"):
        return Path(os.environ["BT_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "battery-trace"


def defaults() -> ServerConfig:
    base = home()
    web = WebSettings(("127.0.0.1", 8080), base / "web.token")
    url = _store_url(os.environ.get(STORE_URL_ENV) or f"sqlite:{base / 'record.sqlite'}", Path.cwd(), STORE_URL_ENV)
    return ServerConfig(url, base / "server.key", IntakeSettings(), RuleSettings(), web)


def load(path: Path | None) -> ServerConfig:
    if path is None:
        return defaults()
    base = defaults()
    root = Section.root(load_toml(path), str(path), path.parent)
    st = root.section("store")
    where = f"{path}: [store] url"
    url = _store_url(st.data.get("url", base.store_url), path.parent, where)
    st.text("url", base.store_url)  # checked above, with the URL redacted in what it says
    if os.environ.get(STORE_URL_ENV):
        url = _store_url(os.environ[STORE_URL_ENV], Path.cwd(), STORE_URL_ENV)
    password_file = st.path("password_file", None)
    if password_file is not None:
        url = _with_password(url, password_file, f"{path}: [store] password_file")
    st.finish()
    srv = root.section("server")
    key_path = srv.path("key", str(base.key_path))
    next_key_path = srv.path("next_key", None)
    if next_key_path is not None and next_key_path == key_path:
        raise srv.error("next_key", "names the same file as key; the next key is another key")
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
        clock_tolerance_minutes=r.number("clock_tolerance_minutes", 15.0, low=0.0, high=525600),
    )
    r.finish()
    w = root.section("web")
    listen = _listen(w, "listen", "127.0.0.1:8080")
    token_path = w.path("token_file", str(key_path.parent / "web.token"))
    dw = base.web
    web = WebSettings(
        listen,
        token_path,
        max_connections=w.integer("max_connections", dw.max_connections, low=1, high=100_000),
        header_timeout_s=w.number("header_timeout_s", dw.header_timeout_s, low=0.5, high=300),
    )
    w.finish()
    p = root.section("pki")
    crl_path = p.path("crl", None)
    p.finish()
    q = root.section("quarantine")
    dq = QuarantineLimits()
    limits = QuarantineLimits(
        max_age_days=q.number("max_age_days", dq.max_age_days, low=1.0, high=36500),
        max_bytes=q.integer("max_megabytes", dq.max_bytes >> 20, low=1, high=1 << 24) << 20,
    )
    q.finish()
    root.finish()
    return ServerConfig(url, key_path, intake, rule_settings, web, limits, next_key_path, crl_path)


def _store_url(url: object, base_dir: Path, where: str) -> str:
    """A checked store URL; a relative SQLite path is taken from ``base_dir`` (the config file's folder)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"{where}: must be non-empty text")
    if url.startswith("sqlite:"):
        name = url.removeprefix("sqlite:")
        return url if name.startswith("/") else f"sqlite:{(base_dir / name).resolve()}"
    valid = "valid: sqlite:PATH or postgresql://USER@HOST:PORT/DB"
    if not url.startswith(POSTGRES):
        raise ConfigError(f"{where} = {redact(url)!r}: is not a store URL; {valid}")
    try:
        urllib.parse.urlsplit(url).port  # noqa: B018 - raises for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"{where} = {redact(url)!r}: {exc}; {valid}") from None
    return url


def _with_password(url: str, path: Path, where: str) -> str:
    if not url.startswith(POSTGRES):
        raise ConfigError(f"{where}: a password is for a PostgreSQL store; the store is {redact(url)}")
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        raise ConfigError(f"{where}: the store URL {redact(url)} already holds a password; give it once")
    try:
        password = read_bounded(path, 4096).decode("utf-8").strip()
    except (UnreadableInput, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {path}: {exc}") from None
    if not password:
        raise ConfigError(f"{where}: {path} is empty")
    secret = urllib.parse.quote(password, safe="")
    user, _, hostinfo = parts.netloc.rpartition("@")
    if not user:
        raise ConfigError(f"{where}: the store URL {redact(url)} names no user; e.g. postgresql://battery@HOST/DB")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{secret}@{hostinfo}"))


def _listen(s: Section, key: str, default: str) -> tuple[str, int] | None:
    text = s.text(key, default)
    if text == "off":
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise s.error(key, "must be HOST:PORT, e.g. 127.0.0.1:8080 or 0.0.0.0:8080 (or 'off')")
    return host.strip("[]"), int(port)
