"""Deterministic CBOR and the strict decoder, cross-checked against cbor2 as an independent implementation."""

import math
import struct

import cbor2
import pytest
from battery_trace.protocol import cbor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import NOT_BUILT, missing_service

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.integers(-1000, 1000) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


@pytest.mark.parametrize(
    ("hex_", "value"),
    [  # RFC 8949 Appendix A
        ("00", 0),
        ("1903e8", 1000),
        ("3863", -100),
        ("1b000000e8d4a51000", 1000000000000),
        ("3bffffffffffffffff", -18446744073709551616),
        ("f93c00", 1.0),
        ("fb3ff199999999999a", 1.1),
        ("f90001", 5.960464477539063e-08),
        ("6449455446", "IETF"),
        ("4401020304", b"\x01\x02\x03\x04"),
        ("83010203", [1, 2, 3]),
        ("a201020304", {1: 2, 3: 4}),
        ("a26161016162820203", {"a": 1, "b": [2, 3]}),
        ("f4", False),
        ("f6", None),
    ],
)
def test_rfc8949_examples_decode(hex_, value):
    assert cbor.decode(bytes.fromhex(hex_), deterministic=True) == value


def test_map_keys_follow_bytewise_order_of_their_encoding():
    # RFC 8949 §4.2.1: 10, 100, -1, "z", "aa", [100], [-1], false is the core deterministic order;
    # we allow only integer and text keys, so check the subset.
    encoded = cbor.encode({"aa": 5, "z": 4, -1: 3, 100: 2, 10: 1})
    assert encoded == bytes.fromhex("a50a011864022003617a0462616105")


@given(values)
def test_encode_is_deterministic_and_round_trips(value):
    encoded = cbor.encode(value)
    decoded = cbor.decode(encoded, deterministic=True)
    assert cbor.encode(decoded) == encoded
    assert _same(decoded, value)


@given(values)
def test_strict_decoder_agrees_with_cbor2_on_valid_input(value):
    loose = cbor2.dumps(value)  # cbor2's default, non-canonical encoder
    assert _same(cbor.decode(loose), cbor2.loads(loose))


@pytest.mark.parametrize(
    ("hex_", "fragment"),
    [
        ("1817", "shortest"),  # 23 in two bytes
        ("190017", "shortest"),
        ("a2616201616101", "order"),  # {"b":1,"a":1}
        ("fb3ff8000000000000", "shortest"),  # 1.5 as float64
        ("fa3fc00000", "shortest"),  # 1.5 as float32
    ],
)
def test_deterministic_mode_refuses_other_encodings(hex_, fragment):
    data = bytes.fromhex(hex_)
    cbor.decode(data)  # well-formed ...
    with pytest.raises(cbor.CborError, match=fragment):
        cbor.decode(data, deterministic=True)  # ... but not the one deterministic form


@pytest.mark.parametrize(
    ("hex_", "fragment"),
    [
        ("", "empty"),
        ("a2616101616102", "duplicate"),
        ("9f01ff", "indefinite"),
        ("5f4101ff", "indefinite"),
        ("0102", "trailing"),
        ("830102", "longer than the data"),
        ("1a0102", "truncated"),
        ("5bffffffffffffffff", "only 0 left"),
        ("9bffffffffffffffff", "longer than the data"),
        ("bbffffffffffffffff", "longer than the data"),
        ("62c328", "UTF-8"),
        ("c11a514b67b0", "tag 1"),
        ("f7", "simple value"),
        ("fb7ff8000000000000", "NaN"),
        ("a1f601", "map keys"),
        ("1c", "reserved"),
        ("ff", "break"),
        ("81" * 40 + "00", "deeper"),
    ],
)
def test_hostile_input_is_refused_with_a_clear_error(hex_, fragment):
    with pytest.raises(cbor.CborError, match=fragment):
        cbor.decode(bytes.fromhex(hex_))


def test_encoder_refuses_values_outside_the_contract():
    for bad in (math.nan, math.inf, {1.5: 1}, {b"k": 1}, object()):
        with pytest.raises(ValueError):
            cbor.encode(bad)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_cbor_error(data):
    try:
        cbor.decode(data, tags=frozenset({18}))
    except cbor.CborError as err:
        assert 0 <= err.offset <= len(data)


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@pytest.fixture(params=["c_check", "cbor2_reencode"])
def fast_path(request, monkeypatch):
    """Each deterministic fast path: the C form check (which CI must have built) and cbor2 re-encoding."""
    if request.param == "c_check" and cbor._cbor_check is None:
        missing_service("battery_trace.protocol._cbor_check", NOT_BUILT)
    if request.param == "cbor2_reencode":
        monkeypatch.setattr(cbor, "_cbor_check", None)
    return request.param


same_path_throughout = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


def _agree(data: bytes, deterministic: bool, tags: frozenset[int] = frozenset()) -> None:
    """The fast path either declines or returns exactly what the strict decoder returns."""
    try:
        strict = cbor.decode_strict(data, deterministic=deterministic, tags=tags)
    except cbor.CborError:
        strict = cbor.CborError
    try:
        fast = cbor._fast(data, deterministic, tags, cbor.MAX_DEPTH)
    except cbor._NotSure:
        return
    assert strict is not cbor.CborError, f"fast path accepted what the strict decoder refuses: {data.hex()}"
    assert _same(fast, strict)


@given(st.binary(max_size=200), st.booleans())
@same_path_throughout
def test_fast_path_agrees_with_the_strict_decoder_on_arbitrary_bytes(fast_path, data, deterministic):
    _agree(data, deterministic, frozenset({18}))


@given(values, st.booleans())
@same_path_throughout
def test_fast_path_agrees_on_every_encoding_of_a_value(fast_path, value, deterministic):
    _agree(cbor2.dumps(value), deterministic)
    _agree(cbor2.dumps(value, canonical=True), deterministic)
    _agree(cbor.encode(value), deterministic)


@given(st.floats(allow_nan=True, allow_infinity=True, width=64) | st.floats(width=32) | st.floats(width=16))
@same_path_throughout
def test_fast_path_agrees_on_each_width_of_a_float(fast_path, value):
    """Half, single and double encodings of one value: only the shortest exact one is deterministic."""
    for fmt, initial in ((">e", b"\xf9"), (">f", b"\xfa"), (">d", b"\xfb")):
        try:
            packed = struct.pack(fmt, value)
        except (OverflowError, struct.error):
            continue
        for data in (initial + packed, b"\x82" + initial + packed + b"\x00", b"\xa1\x61k" + initial + packed):
            _agree(data, deterministic=True)


@pytest.mark.parametrize(
    "hex_",
    [
        "f90001",  # the smallest half subnormal
        "f98000",  # -0.0
        "fa33800000",  # 2**-24 as a single: a half holds it
        "fa7f7fffff",  # the largest single
        "fb47efffffe0000000",  # the largest single, as a double
        "fb47f0000000000000",  # 2**128: beyond every single
        "a2200a0a01",  # {-1: 10, 10: 1}: -1 encodes as 0x20, after 0x0a
        "a2616101616101",  # a duplicate key
        "a141aa01",  # a byte-string key
        "c11a514b67b0",  # a tag
        "81" * 16 + "00",  # as deep as allowed
        "81" * 17 + "00",  # one deeper
    ],
)
def test_fast_paths_agree_on_edge_cases(fast_path, hex_):
    _agree(bytes.fromhex(hex_), deterministic=True)


def test_the_c_check_takes_int_keyed_maps_in_bytewise_order(fast_path):
    event_like = cbor.encode({"seq": 1, "health": {"cells_v": [3.3, 3.301]}, "prev": bytes(32)})
    assert cbor._fast(event_like, True, frozenset(), cbor.MAX_DEPTH)["seq"] == 1
    mixed = cbor.encode({24: 1, -1: 2})  # bytewise order here differs from cbor2's length-first order
    if fast_path == "c_check":
        assert cbor._fast(mixed, True, frozenset(), cbor.MAX_DEPTH) == {24: 1, -1: 2}
    else:
        with pytest.raises(cbor._NotSure):
            cbor._fast(mixed, True, frozenset(), cbor.MAX_DEPTH)
    assert cbor.decode(mixed, deterministic=True) == {24: 1, -1: 2}  # the strict decoder accepts it either way


@given(values)
def test_the_c_check_accepts_every_deterministic_encoding(value):
    """No needless trips to the slow strict decoder: whatever our encoder writes, the C check vouches for."""
    if cbor._cbor_check is None:
        missing_service("battery_trace.protocol._cbor_check", NOT_BUILT)
    encoded = cbor.encode(value)
    assert cbor._cbor_check.deterministic(encoded, cbor.MAX_DEPTH)
    assert _same(cbor._fast(encoded, True, frozenset(), cbor.MAX_DEPTH), value)


# Every tag number cbor2 gives a meaning of its own (or may), and a few it does not: a decoder that turns
# a tag into a plain value (a bignum into an int, a self-described item into the item) must never let the
# fast path accept what the strict decoder refuses, with or without the C check.
SEMANTIC_TAGS = [*range(301), 1004, 1040, 55799, 55800, 65535, 2**32 - 1]
TAGGED_CONTENT = st.one_of(
    st.integers(0, 2**64 - 1),
    st.binary(max_size=12),
    st.text(max_size=8),
    st.lists(st.integers(0, 30), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2),
)


@given(TAGGED_CONTENT, st.booleans())
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fast_path_agrees_on_every_tag_cbor2_knows(fast_path, content, deterministic):
    for tag in SEMANTIC_TAGS:
        item = cbor._head(6, tag) + cbor.encode(content)
        for data in (item, b"\x81" + item, b"\xa1\x61a" + item):
            for tags in (frozenset(), frozenset({18})):
                _agree(data, deterministic, tags)


@pytest.mark.parametrize("tag", [2, 3, 28, 55799])
def test_tags_cbor2_would_turn_into_plain_values_are_refused_by_decode(fast_path, tag):
    data = b"\xa1\x61a" + cbor._head(6, tag) + (cbor.encode(b"\x01" + bytes(8)) if tag in (2, 3) else b"\x01")
    for deterministic in (True, False):
        with pytest.raises(cbor.CborError, match=f"tag {tag} is not allowed"):
            cbor.decode(data, deterministic=deterministic, tags=frozenset({18}))
