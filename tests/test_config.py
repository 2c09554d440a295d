"""Config loading: the shipped examples load; every mistake names the key, the value and what is valid."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from battery_trace.agent import config as agent_config
from battery_trace.protocol import keys
from battery_trace.server import config as server_config
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from battery_trace.settings import ConfigError

CONFIGS = Path(__file__).parent.parent / "configs"


def shipped(tmp_path: Path, name: str) -> Path:
    """A shipped example config, with its files pointed into a temporary folder that has them."""
    text = (CONFIGS / name).read_text()
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "server.pub").write_text(keys.generate().public.pem())
    for placeholder in ("ca.pem", "device.crt", "device-tls.key"):
        (tmp_path / placeholder).write_text("placeholder")
    shutil.copy(CONFIGS / "vendor-pack.dbc", tmp_path / "vendor-pack.dbc")
    text = text.replace("/etc/battery-agent/", "").replace("/var/lib/battery-agent/", "")
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.fixture
def gateway(tmp_path) -> Path:
    return shipped(tmp_path, "agent-gateway.toml")


def test_shipped_gateway_example_loads(gateway):
    cfg = agent_config.load(gateway)
    assert cfg.device == "gateway-0042" and cfg.site_kind == "gateway"
    assert cfg.slots[0].code == "0RJPEA00HAU0AAG1C3000123" and cfg.slots[0].serial.port == "/dev/bms-slot1"
    assert cfg.mqtt.tls and cfg.mqtt.tls.ca == str(gateway.parent / "ca.pem")  # relative to the config file
    assert cfg.outbox_path == gateway.parent / "outbox.sqlite"


def test_shipped_swap_station_rig_and_submitter_examples_load(tmp_path):
    station = agent_config.load(shipped(tmp_path / "station", "agent-swap-station.toml"))
    assert station.site_kind == "swap_station" and [s.slot for s in station.slots] == [1, 2, 3]
    assert station.slots[1].can.interface == "slcan" and station.slots[1].can.options == {"tty_baudrate": 115200}
    dbc_slot = station.slots[2].can
    assert dbc_slot.protocol == "dbc" and dbc_slot.dbc_mapping.code.length == 24
    assert dbc_slot.dbc_mapping.charge_positive is False
    assert sorted(line.kind for line in station.lines) == ["plc", "scanner", "scanner"]
    rig = agent_config.load(shipped(tmp_path / "rig", "agent-maintenance-rig.toml"))
    assert rig.site_kind == "maintenance_rig" and rig.slots[0].serial.protocol == "daly"
    submitter = agent_config.load(shipped(tmp_path / "submitter", "agent-submitter.toml"))
    assert submitter.role == "manufacturer" and submitter.slots == ()


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
        ('role = "gateway"', 'role = "janitor"', "role = 'janitor': is not valid; valid: manufacturer"),
        ('listen = "127.0.0.1:9108"', 'listen = "0.0.0.0:9108"', "must be a loopback address"),
        ("budget_mb = 512", "budget_mb = 0", "[outbox] budget_mb = 0: is out of range"),
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


def test_dbc_mapping_mistakes_are_named(tmp_path):
    path = shipped(tmp_path, "agent-swap-station.toml")
    text = path.read_text()
    for old, new, message in [
        ('soc_pct = "PackStatus.StateOfCharge"', 'soc_pct = "PackStatus.SOC"', "no signal 'PackStatus.SOC'"),
        ('soc_pct = "PackStatus.StateOfCharge"', 'charge = "PackStatus.StateOfCharge"', "is not a reading field"),
        ('dbc = "vendor-pack.dbc"', 'dbc = "missing.dbc"', "not a DBC file"),
        ('text = ["IdText0"', 'text = [1, "IdText0"', "must be a non-empty list of text"),
        ('protocol = "dbc"', 'protocol = "j1708"', "valid: gbt27930, dbc"),
    ]:
        assert old in text, old
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ConfigError) as err:
            agent_config.load(path)
        assert message in str(err.value), str(err.value)


def test_a_plc_belongs_to_a_swap_station(tmp_path):
    path = shipped(tmp_path, "agent-gateway.toml")
    path.write_text(path.read_text() + '\n[plc]\nport = "/dev/ttyS1"\n')
    with pytest.raises(ConfigError, match="belongs to site kind 'swap_station'"):
        agent_config.load(path)
