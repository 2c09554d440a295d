"""Config loading: the shipped examples load; every mistake names the key, the value and what is valid."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from agent import config as agent_config
from protocol import keys
from protocol.settings import ConfigError
from server import config as server_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture
def gateway(tmp_path) -> Path:
    """The shipped gateway example, with its key files pointed into a temporary folder."""
    text = (CONFIGS / "agent-gateway.toml").read_text()
    (tmp_path / "server.pub").write_text(keys.generate().public.pem())
    (tmp_path / "ca.pem").write_text("placeholder")
    text = text.replace("/etc/battery-agent/", "").replace("/var/lib/battery-agent/", "")
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_shipped_gateway_example_loads(gateway):
    cfg = agent_config.load(gateway)
    assert cfg.device == "gateway-0042" and cfg.site_kind == "gateway"
    assert cfg.slots[0].code == "0RJPEA00HAU0AAG1C3000123" and cfg.slots[0].serial.port == "/dev/bms-slot1"
    assert cfg.mqtt.tls_ca == str(gateway.parent / "ca.pem")  # relative to the config file
    assert cfg.outbox_path == gateway.parent / "outbox.sqlite"


def test_shipped_server_example_loads(tmp_path):
    shutil.copy(CONFIGS / "server.toml", tmp_path / "server.toml")
    cfg = server_config.load(tmp_path / "server.toml")
    assert cfg.store_url == "sqlite:/var/lib/battery-server/record.sqlite"
    assert cfg.intake.batch_max == 500


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("resend_after_s = 30", "resend_after = 30", "unknown key 'resend_after' in [mqtt]; valid: "),
        ("port = 8883", "port = 70000", "[mqtt] port = 70000: is out of range; valid: 1..65535"),
        ("port = 8883", 'port = "8883"', "[mqtt] port = '8883': must be a whole number"),
        ('id = "gateway-0042"', 'id = "Gateway-0042"', "use 'gateway-0042'"),
        ('kind = "gateway"', 'kind = "spaceport"', "kind = 'spaceport': is not valid; valid: gateway"),
        ('code = "0RJPEA00HAU0AAG1C3000123"', 'code = "0RJPEA00HAU0AAG1C300012"', "23 characters"),
        ('protocol = "jbd"', 'protocol = "modbus"', "[slots[0].serial] protocol = 'modbus'"),
        ('public_key = "server.pub"', 'public_key = "nothing.pub"', "neither 64 hex characters nor"),
        ('tls_ca = "ca.pem"', 'tls_ca = "missing.pem"', "does not exist"),
        ("[outbox]", "[outbox", "not valid TOML"),
        ("slot = 1", "", "[slots[0]] slot: is required"),
    ],
)
def test_agent_config_mistakes_are_named(gateway, old, new, message):
    text = gateway.read_text()
    assert old in text
    gateway.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        agent_config.load(gateway)
    assert message in str(err.value)
    assert str(gateway) in str(err.value)


def test_tls_client_certificate_needs_a_ca(gateway):
    gateway.write_text(gateway.read_text().replace('tls_ca = "ca.pem"', 'tls_cert = "ca.pem"\ntls_key = "ca.pem"'))
    with pytest.raises(ConfigError, match=r"tls_ca.*TLS is all or nothing"):
        agent_config.load(gateway)


def test_duplicate_slots_are_refused(gateway):
    text = gateway.read_text()
    slot = text[text.index("\n[[slots]]") :]
    gateway.write_text(text + "\n" + slot)
    with pytest.raises(ConfigError, match="used twice"):
        agent_config.load(gateway)


def test_missing_or_oversized_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        agent_config.load(tmp_path / "none.toml")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 * 1024 * 1024))
    with pytest.raises(ConfigError, match="larger than"):
        server_config.load(big)


@hsettings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_arbitrary_text_gives_config_errors_only(tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    for load in (agent_config.load, server_config.load):
        with contextlib.suppress(ConfigError):
            load(path)


def test_server_rules_and_store_url_are_checked(tmp_path):
    path = tmp_path / "server.toml"
    shutil.copy(CONFIGS / "server.toml", path)
    cfg = server_config.load(path)
    assert cfg.rules.unaccounted_days == 30 and cfg.rules.deadlines_days["installed"] == 15
    text = path.read_text()
    for old, new, message in [
        ("installed = 15", "instaled = 15", "[rules.deadlines_days] instaled: is not an event type"),
        ("unaccounted_days = 30", "unaccounted_days = -1", "[rules] unaccounted_days = -1: is out of range"),
        ('url = "sqlite:/var/lib', 'url = "mysql://x/var/lib', "is not a store URL"),
        ("receive_max = 2000", "receive_max = 0", "[intake] receive_max = 0: is out of range"),
    ]:
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError) as err:
            server_config.load(path)
        assert message in str(err.value)
