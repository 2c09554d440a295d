"""Keys: OS randomness, 0600 files that are never overwritten, strict loading of public keys."""

import os
import stat

import pytest
from battery_trace.protocol import keys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec as ec_key


def test_saved_key_is_private_and_loads_back(tmp_path):
    key = keys.generate()
    path = tmp_path / "device.key"
    os.umask(0o022)
    keys.save_private(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert keys.load_private(path).public == key.public


def test_existing_key_is_never_overwritten(tmp_path):
    path = tmp_path / "device.key"
    keys.save_private(keys.generate(), path)
    before = path.read_bytes()
    with pytest.raises(keys.InvalidKey, match="refusing to overwrite"):
        keys.save_private(keys.generate(), path)
    assert path.read_bytes() == before


def test_two_generated_keys_differ():
    assert keys.generate().public != keys.generate().public


def test_public_key_exports_round_trip():
    public = keys.generate().public
    assert keys.parse_public(public.hex) == public
    assert keys.parse_public(public.pem()) == public
    assert public.kid == keys.key_id(public.raw) and len(public.kid) == 16


def test_public_key_from_a_pem_file_or_hex(tmp_path):
    public = keys.generate().public
    path = tmp_path / "server.pub"
    path.write_text(public.pem())
    assert keys.load_public(str(path)) == public
    assert keys.load_public(public.hex.upper()) == public


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("00" * 31, "64 hex"),
        ("zz" * 32, "neither"),
        ("01" + "00" * 31, "not a sound"),  # the identity point: small order, forgeable
        ("ec" + "ff" * 30 + "7f", "not a sound"),  # y = p - 1: not canonical
    ],
)
def test_unsound_public_keys_are_refused(text, fragment):
    with pytest.raises(keys.InvalidKey, match=fragment):
        keys.load_public(text)


def test_a_non_ed25519_or_garbled_key_file_is_named(tmp_path):
    ec = ec_key.generate_private_key(ec_key.SECP256R1())
    path = tmp_path / "p256.pem"
    path.write_bytes(
        ec.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(keys.InvalidKey, match="not an Ed25519 key"):
        keys.load_private(path)
    path.write_bytes(b"junk")
    with pytest.raises(keys.InvalidKey, match="not an unencrypted PKCS#8"):
        keys.load_private(path)
    with pytest.raises(keys.InvalidKey, match="cannot read"):
        keys.load_private(tmp_path / "missing.pem")


def test_private_key_repr_does_not_leak_the_seed():
    key = keys.generate()
    assert key.seed.hex() not in repr(key)
