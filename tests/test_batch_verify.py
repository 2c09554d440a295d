"""The collector's batch signature check gives exactly PyNaCl's answer, signature by signature.

The lock-free path (the C extension calling libsodium) and the per-call path (PyNaCl) are checked
against each other and against `cryptography`, on valid signatures and on every kind of damage; how
much the lock-free path overlaps with Python work is measured in bench/limits (verify beside a busy
thread), not asserted here.
"""

import pytest
from battery_trace.protocol import keys
from battery_trace.server import batch_verify
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NOT_BUILT, missing_service

KEYS = [keys.generate() for _ in range(3)]


@pytest.fixture(params=["lock_free", "per_call"])
def path(request, monkeypatch):
    """Run a test through each path; the lock-free one must exist wherever the tests run in CI."""
    if request.param == "lock_free" and not batch_verify.lock_free():
        missing_service("battery_trace.server._ed25519_batch", NOT_BUILT)
    if request.param == "per_call":
        monkeypatch.setattr(batch_verify, "_ed25519_batch", None)
    return request.param


def reference(public: keys.PublicKey, message: bytes, signature: bytes) -> bool:
    """An independent verifier: `cryptography`'s Ed25519 (OpenSSL), not libsodium."""
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public.raw).verify(signature, message)
    except Exception:
        return False
    return True


def test_valid_and_damaged_signatures_in_one_batch(path):
    message = b"\xd2\x84" + bytes(range(256)) * 2
    good = [(k.public, message + bytes([i]), k.sign(message + bytes([i]))) for i, k in enumerate(KEYS)]
    key, signed, signature = good[0]
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    jobs = [
        *good,
        (key, signed + b"x", signature),  # a different message
        (KEYS[1].public, signed, signature),  # another device's key
        (key, signed, flipped),  # a damaged signature
        (key, signed, signature[:63]),  # a short signature
        (key, signed, signature + b"\x00"),  # a long one
        (key, b"", KEYS[0].sign(b"")),  # the empty message, validly signed
    ]
    assert batch_verify.verify_all(jobs) == [True, True, True, False, False, False, False, False, True]


def test_an_empty_batch(path):
    assert batch_verify.verify_all([]) == []


@given(
    st.lists(
        st.tuples(st.integers(0, len(KEYS) - 1), st.binary(max_size=300), st.sampled_from(["good", "bit", "key"])),
        max_size=20,
    ),
    st.integers(0, 511),
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path stays the same throughout
def test_agrees_with_an_independent_verifier(path, cases, bit):
    jobs = []
    for key_index, message, damage in cases:
        key = KEYS[key_index]
        signature = key.sign(message)
        if damage == "bit":
            signature = bytearray(signature)
            signature[bit // 8] ^= 1 << (bit % 8)
            signature = bytes(signature)
        public = KEYS[(key_index + 1) % len(KEYS)].public if damage == "key" else key.public
        jobs.append((public, message, signature))
    assert batch_verify.verify_all(jobs) == [reference(*job) for job in jobs]


def test_the_extension_refuses_what_is_not_a_job():
    if not batch_verify.lock_free():
        missing_service("battery_trace.server._ed25519_batch", NOT_BUILT)
    from battery_trace.server import _ed25519_batch

    address = batch_verify._verify_address()
    with pytest.raises(TypeError, match="job 1 must be a tuple"):
        _ed25519_batch.verify_all(address, [(b"k" * 32, b"m", b"s" * 64), (b"k" * 32, "text", b"s" * 64)])
    with pytest.raises(TypeError):
        _ed25519_batch.verify_all(address, 5)
    with pytest.raises(ValueError, match="no verification function"):
        _ed25519_batch.verify_all(0, [])
