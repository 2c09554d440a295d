"""The command lines as a technician, an operator or a script uses them: output and exit codes."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import cbor2
from battery_trace.protocol import envelope, events, keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.event_examples import PACK, event

BIN = Path(sys.executable).parent


def run(name: str, *args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / name), *args], input=stdin, capture_output=True, timeout=60, env=env)


def test_keygen_writes_a_private_key_0600_and_never_overwrites(tmp_path):
    out = tmp_path / "device.key"
    done = run("battery-agent", "keygen", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert keys.load_private(out).public.hex == info["public_key"]
    assert keys.load_public(str(out.with_suffix(".pub"))).hex == info["public_key"]
    shown = run("battery-agent", "pubkey", "--key", str(out), "--pem")
    assert shown.returncode == 0 and keys.parse_public(shown.stdout.decode()).hex == info["public_key"]
    assert run("battery-agent", "pubkey", "--key", str(tmp_path / "none.key")).returncode == 2
    before = out.read_bytes()
    again = run("battery-agent", "keygen", "--out", str(out))
    assert again.returncode == 2 and b"refusing to overwrite" in again.stderr
    assert out.read_bytes() == before


def test_code_exit_codes_and_json():
    ok = run("battery-agent", "code", PACK.lower())
    assert ok.returncode == 0
    assert json.loads(ok.stdout)["production_date"]["date"] == "2026-01-12"
    mixed = run("battery-agent", "code", PACK, "0RJPEA00HAU0AAG1C300012")
    assert mixed.returncode == 1
    lines = [json.loads(line) for line in mixed.stdout.splitlines()]
    assert [x["valid"] for x in lines] == [True, False]
    assert b"23 characters" in mixed.stderr
    assert run("battery-agent", "code").returncode == 2
    piped = run("battery-agent", "code", "-", stdin=f"{PACK}\r\n\n{PACK}\n".encode())
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2


def test_verify_our_event_prints_it_as_json(tmp_path):
    key = keys.generate()
    data = envelope.sign(events.encode(event()), key)
    (tmp_path / "e.cose").write_bytes(data)
    done = run("battery-server", "verify", "--key", key.public.hex, str(tmp_path / "e.cose"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["code"] == PACK
    as_hex = run("battery-server", "verify", "--key", key.public.hex, "-", stdin=data.hex().encode() + b"\n")
    assert as_hex.returncode == 0


def test_verify_any_cose_sign1_prints_its_payload_bytes(tmp_path):
    secret = Ed25519PrivateKey.generate()
    protected = cbor2.dumps({1: -8})
    payload = b"\x00\x01binary payload\xff"
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    data = cbor2.dumps(cbor2.CBORTag(18, [protected, {4: b"x"}, payload, secret.sign(to_sign)]))
    pem = tmp_path / "k.pem"
    pem.write_text(keys.PublicKey(secret.public_key().public_bytes_raw()).pem())
    done = run("battery-server", "verify", "--key", str(pem), "-", stdin=data)
    assert done.returncode == 0 and done.stdout == payload


def test_verify_invalid_is_1_and_usage_is_2(tmp_path):
    data = envelope.sign(b"x", keys.generate())
    wrong = run("battery-server", "verify", "--key", keys.generate().public.hex, "-", stdin=data)
    assert wrong.returncode == 1 and b"bad_signature" in wrong.stderr
    garbage = run("battery-server", "verify", "--key", keys.generate().public.hex, "-", stdin=b"\x00garbage")
    assert garbage.returncode == 1 and b"malformed" in garbage.stderr
    assert run("battery-server", "verify", "--key", "nonsense", "-", stdin=data).returncode == 2
    missing = run("battery-server", "verify", "--key", keys.generate().public.hex, str(tmp_path / "none"))
    assert missing.returncode == 2 and b"cannot read" in missing.stderr
    assert run("battery-server", "verify", "-").returncode == 2  # --key is required


def test_inspect_shows_headers_and_payload_without_a_key():
    key = keys.generate()
    data = envelope.sign(events.encode(event("installed")), key)
    done = run("battery-server", "inspect", "-", stdin=data)
    assert done.returncode == 0
    shown = json.loads(done.stdout)
    assert shown["envelope"]["kid"] == key.public.kid.hex() and shown["envelope"]["alg"] == "EdDSA"
    assert shown["payload"]["event"]["type"] == "installed"
    assert run("battery-server", "inspect", "-", stdin=b"nope").returncode == 1


def test_devices_enroll_works_without_a_config_and_refuses_bad_keys(tmp_path):
    env = {"BT_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    key = keys.generate().public.hex
    done = run("battery-server", "devices", "enroll", "station-1", "--role", "swap_operator", "--key", key, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "home" / "record.sqlite").exists()
    listed = json.loads(run("battery-server", "devices", "list", "--json", env=env).stdout)
    assert listed[0]["public_key"] == key and listed[0]["role"] == "swap_operator"
    small_order = "01" + "00" * 31
    bad = run("battery-server", "devices", "enroll", "station-2", "--role", "gateway", "--key", small_order, env=env)
    assert bad.returncode == 2 and b"not a sound Ed25519" in bad.stderr
    upper = run("battery-server", "devices", "enroll", "Station-3", "--role", "gateway", "--key", key, env=env)
    assert upper.returncode == 2 and b"use 'station-3'" in upper.stderr
    twice = run("battery-server", "devices", "enroll", "station-1", "--role", "swap_operator", "--key", key, env=env)
    assert twice.returncode == 1 and b"already enrolled" in twice.stderr


def test_help_has_examples():
    for name, sub in [("battery-agent", "keygen"), ("battery-agent", "code"), ("battery-server", "verify")]:
        done = run(name, sub, "--help")
        assert done.returncode == 0 and b"example" in done.stdout
