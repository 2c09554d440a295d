"""COSE_Sign1 envelopes: strict verification, and interoperability in both directions.

The "other implementation" here is built from parts that share no code with protocol/: the
Sig_structure is assembled byte by byte from RFC 9052 §4.4, the envelope is framed with cbor2, and
signatures are made and checked with `cryptography` (our code signs and verifies with libsodium).
"""

import hashlib

import cbor2
import pytest
from battery_trace.protocol import cbor, envelope, keys
from battery_trace.protocol.keys import PrivateKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
RFC8032_EMPTY_SIG = (
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def bstr(data: bytes) -> bytes:
    """A CBOR byte string head written out by hand (RFC 8949 §3.1), for the independent Sig_structure."""
    n = len(data)
    if n < 24:
        head = bytes([0x40 | n])
    elif n < 256:
        head = bytes([0x58, n])
    elif n < 65536:
        head = bytes([0x59]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x5A]) + n.to_bytes(4, "big")
    return head + data


def independent_sig_structure(protected: bytes, payload: bytes) -> bytes:
    # ["Signature1", protected, h'', payload]: array(4), text(10) "Signature1", bstr, empty bstr, bstr
    return b"\x84" + b"\x6aSignature1" + bstr(protected) + b"\x40" + bstr(payload)


def foreign_sign1(secret: Ed25519PrivateKey, payload: bytes, protected: bytes, unprotected: dict) -> bytes:
    signature = secret.sign(independent_sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, signature]))


def test_ed25519_matches_rfc8032_test_vector_1():
    key = PrivateKey(RFC8032_SEED)
    assert key.public.hex == RFC8032_PUBLIC
    assert key.sign(b"").hex() == RFC8032_EMPTY_SIG


@pytest.mark.parametrize(
    ("protected_map", "unprotected"),
    [
        ({1: -8}, {4: b"11"}),  # kid in the unprotected header, as in the COSE WG examples
        ({4: b"foreign-kid", 1: -8}, {}),  # kid protected, keys in non-deterministic order
        ({1: -19, 3: "application/json"}, {4: b"k"}),  # fully specified Ed25519 alg, a content type
        ({1: -8, 2: [3], 3: 0}, {}),  # a critical header we understand
    ],
)
def test_envelopes_from_another_implementation_verify(protected_map, unprotected):
    secret = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED)
    payload = b'{"any": "payload, not one of our events"}'
    data = foreign_sign1(secret, payload, cbor2.dumps(protected_map), unprotected)
    env = envelope.verify(data, keys.parse_public(RFC8032_PUBLIC))
    assert env.payload == payload
    assert env.kid == (protected_map.get(4) or unprotected.get(4))


def test_our_envelopes_verify_in_another_implementation():
    key = keys.generate()
    payload = b"\xa1\x61a\x01"
    data = envelope.sign(payload, key)
    item = cbor2.loads(data)
    assert isinstance(item, cbor2.CBORTag) and item.tag == 18
    protected, unprotected, carried, signature = item.value
    assert cbor2.loads(protected) == {1: -8, 4: key.public.kid}
    assert unprotected == {} and carried == payload
    Ed25519PublicKey.from_public_bytes(key.public.raw).verify(signature, independent_sig_structure(protected, payload))


def test_every_flipped_byte_invalidates_the_envelope():
    key = keys.generate()
    data = envelope.sign(b"\xa2\x61a\x01\x61b\x82\x01\x02" + bytes(100), key)
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(data)
            tampered[i] ^= mask
            with pytest.raises(envelope.EnvelopeError) as err:
                envelope.verify(bytes(tampered), key.public)
            assert err.value.reason in {"malformed", "bad_signature", "unsupported_algorithm"}


def test_wrong_key_is_a_bad_signature():
    data = envelope.sign(b"payload", keys.generate())
    with pytest.raises(envelope.EnvelopeError) as err:
        envelope.verify(data, keys.generate().public)
    assert err.value.reason == "bad_signature"


def test_every_truncation_is_a_clear_malformed_error():
    data = envelope.sign(b"payload", keys.generate())
    for n in range(len(data)):
        with pytest.raises(envelope.EnvelopeError) as err:
            envelope.decode(data[:n])
        assert err.value.reason == "malformed"


@given(st.binary(max_size=300))
def test_garbage_never_crashes_decode_or_verify(data):
    with pytest.raises(envelope.EnvelopeError):
        envelope.verify(data, keys.parse_public(RFC8032_PUBLIC))


@pytest.mark.parametrize(
    ("build", "reason", "fragment"),
    [
        (lambda p, s: cbor2.dumps([p, {}, b"x", s]), "malformed", "tag 18"),
        (lambda p, s: cbor2.dumps(cbor2.CBORTag(18, [p, {}, None, s])), "malformed", "detached"),
        (lambda p, s: cbor2.dumps(cbor2.CBORTag(18, [p, {}, b"x"])), "malformed", "4 items"),
        (
            lambda p, s: cbor2.dumps(cbor2.CBORTag(18, [b"", {1: -8}, b"x", s])),
            "unsupported_algorithm",
            "protected",
        ),
        (
            lambda p, s: cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -7}), {}, b"x", s])),
            "unsupported_algorithm",
            "-7",
        ),
        (lambda p, s: cbor2.dumps(cbor2.CBORTag(18, [p, {1: -8}, b"x", s])), "malformed", "both"),
        (
            lambda p, s: cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -8, 2: [99], 99: 1}), {}, b"x", s])),
            "malformed",
            "critical",
        ),
        (
            lambda p, s: cbor2.dumps(cbor2.CBORTag(18, [b"\xff", {}, b"x", s])),
            "malformed",
            "protected header",
        ),
    ],
)
def test_structural_problems_are_named(build, reason, fragment):
    data = build(cbor2.dumps({1: -8}), bytes(64))
    with pytest.raises(envelope.EnvelopeError, match=fragment) as err:
        envelope.verify(data, keys.generate().public)
    assert err.value.reason == reason


def test_size_limit_is_checked_before_decoding():
    with pytest.raises(envelope.EnvelopeError) as err:
        envelope.decode(b"\xd2" + bytes(envelope.MAX_ENVELOPE))
    assert err.value.reason == "too_large"


def test_hash_for_chaining_is_sha256_of_the_bytes_as_sent():
    data = envelope.sign(b"x", keys.generate())
    assert envelope.decode(data).hash == hashlib.sha256(data).digest()


def _shapes_agree(data: bytes) -> None:
    """The reading straight from the bytes, where it answers, is exactly the general decoder's."""
    usual = envelope._usual_shape(data)
    if usual is None:
        return
    protected, unprotected, payload, signature = envelope._general_shape(data)
    assert (protected, payload, signature) == usual and unprotected == {}


@given(st.binary(max_size=120))
def test_the_usual_shape_agrees_with_the_general_decoder_on_any_bytes(data):
    _shapes_agree(data)
    _shapes_agree(b"\xd2\x84" + data)


@given(st.binary(max_size=300), st.binary(max_size=64), st.integers(0, 3), st.data())
def test_the_usual_shape_agrees_on_every_encoding_and_damage(payload, signature, width, data):
    protected = cbor2.dumps({1: -8, 4: b"k" * 16})
    heads = []
    for part in (protected, payload, signature):  # each length in a chosen, not always shortest, form
        size = 1 << width
        info = 24 + width if len(part) < 1 << (8 * size) else 26
        heads.append(bytes([0x40 | info]) + len(part).to_bytes(1 << (info - 24), "big") + part)
    sealed = b"\xd2\x84" + heads[0] + b"\xa0" + heads[1] + heads[2]
    shortest = all(
        head.startswith(cbor.byte_string_head(len(part)))
        for head, part in zip(heads, (protected, payload, signature), strict=True)
    )
    # Only the canonical outer form is an envelope: a longer head than needed changes the bytes (and the
    # hash the record keys on) without touching the signature.
    assert envelope._usual_shape(sealed) == ((protected, payload, signature) if shortest else None)
    if not shortest:
        with pytest.raises(envelope.EnvelopeError) as err:
            envelope.decode(sealed)
        assert err.value.reason == "malformed"
    _shapes_agree(sealed)
    cut = data.draw(st.integers(0, len(sealed)))
    _shapes_agree(sealed[:cut])
    _shapes_agree(sealed[:cut] + b"\x00" + sealed[cut:])
