"""Lifecycle events: every type round-trips; every schema rule names its field and what is valid."""

import pytest
from battery_trace.protocol import cbor, events
from hypothesis import given
from hypothesis import strategies as st

from tests.event_examples import FIELDS, PACK, event


def test_every_type_of_the_lifecycle_reference_is_defined():
    assert set(events.EVENT_TYPES) == {
        "produced",
        "installed",
        "sold",
        "swapped",
        "health",
        "maintenance",
        "replaced",
        "vehicle_scrapped",
        "handed_over",
        "repurposed",
        "recycled",
    }
    assert set(FIELDS) == set(events.EVENT_TYPES)
    for spec in events.EVENT_TYPES.values():
        assert spec.roles and set(spec.roles) <= set(events.ROLES)


@pytest.mark.parametrize("event_type", sorted(FIELDS))
def test_each_type_round_trips_through_deterministic_cbor(event_type):
    ev = event(event_type)
    payload = events.encode(ev)
    assert events.decode(payload) == ev
    assert cbor.encode(cbor.decode(payload)) == payload


def test_roles_follow_the_lifecycle_reference():
    assert events.roles_for("produced") == ("manufacturer",)
    assert events.roles_for("swapped") == ("swap_operator",)
    assert set(events.roles_for("health")) == {"gateway", "swap_operator", "maintenance"}
    assert "gateway" not in events.roles_for("handed_over")


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [
        (lambda m: m.pop("vin"), "vin", "required"),
        (lambda m: m.update(colour="red"), "colour", "not a field of 'installed'"),
        (lambda m: m.update(vin="LNBSCB3F5PW12345I"), "vin", "without I, O, Q"),
        (lambda m: m.update(code=" " + PACK), "code", "normalised"),
        (lambda m: m.update(type="exploded"), "type", "valid: produced"),
        (lambda m: m.update(source="rumour"), "source", "valid: label"),
        (lambda m: m.update(seq=0), "seq", "out of range"),
        (lambda m: m.update(seq=True), "seq", "integer"),
        (lambda m: m.update(prev=b"\x01" * 32), "prev", "all zeros for the first"),
        (lambda m: m.update(prev=b"short"), "prev", "32 bytes"),
        (lambda m: m.update(time=12), "time", "plausible"),
        (lambda m: m.update(device="Station-1"), "device", "upper case"),
        (lambda m: m.update(v=2), "v", "not supported"),
    ],
)
def test_schema_errors_name_the_field_and_what_is_valid(change, path, fragment):
    m = event("installed").to_map()
    change(m)
    with pytest.raises(events.EventError) as err:
        events.from_map(m)
    assert any(e.path == path and fragment in e.message for e in err.value.errors), err.value.errors


def test_nested_values_are_checked_with_their_path():
    bad = event("health", health={"voltage_v": -3, "cells_v": [3.4, "x"], "mood": 1}).to_map()
    with pytest.raises(events.EventError) as err:
        events.from_map(bad)
    paths = {e.path for e in err.value.errors}
    assert paths == {"health.voltage_v", "health.cells_v[1]", "health.mood"}


def test_choice_errors_list_the_valid_choices():
    with pytest.raises(events.EventError, match="valid: inspection, repair"):
        events.encode(event("maintenance", action="prayer"))


def test_a_payload_with_duplicate_keys_or_another_encoding_is_refused():
    good = events.encode(event())
    m = cbor.decode(good)
    head = bytes([0xA0 + len(m)])
    reordered = head + b"".join(cbor.encode(k) + cbor.encode(v) for k, v in reversed(list(m.items())))
    assert cbor.decode(reordered) == m
    with pytest.raises(events.EventError, match="order"):
        events.decode(reordered)
    duplicated = bytes([0xA1 + len(m)]) + good[1:] + cbor.encode("seq") + cbor.encode(9)
    with pytest.raises(events.EventError, match="duplicate"):
        events.decode(duplicated)


def test_code_breaking_gbt34014_is_a_problem_but_not_a_schema_error():
    ev = event("swapped", code_in="0RJXEA00HAU0AAG1C3000124")
    assert events.decode(events.encode(ev)) == ev
    problems = events.code_problems(ev)
    assert [p.path for p in problems] == ["code_in"]
    assert "product type" in problems[0].message
    assert events.code_problems(event("vehicle_scrapped", codes=[PACK, "BAD"]))[0].path == "codes[1]"


@given(st.binary(max_size=300))
def test_arbitrary_payload_bytes_give_event_errors_only(data):
    with pytest.raises(events.EventError):
        events.decode(data)


@given(st.dictionaries(st.sampled_from([*events.COMMON_FIELDS, "code", "vin", "health", "x"]), st.integers()))
def test_arbitrary_maps_give_field_errors_only(m):
    assert events.event_errors(m)


@given(
    st.lists(st.floats() | st.integers(-(10**20), 10**20) | st.booleans() | st.none() | st.text(max_size=2)),
    st.booleans(),
)
def test_the_fast_numbers_check_agrees_with_the_one_that_names_each_bad_item(items, signed):
    assert events._all_numbers(items, signed) == (events._bad_numbers(items, signed) == [])


health_values = (
    st.floats()
    | st.integers(-(10**20), 10**20)
    | st.booleans()
    | st.none()
    | st.text(max_size=3)
    | st.lists(st.floats() | st.integers(-5, 5) | st.booleans() | st.text(max_size=2), max_size=4)
)


@given(st.dictionaries(st.sampled_from([*events.HEALTH_FIELDS, "x", "Cells_V"]), health_values, min_size=1))
def test_the_health_check_passes_exactly_what_the_full_check_finds_no_fault_in(health):
    """The hot path's one-test pass for good numbers may skip the full check only where it finds nothing."""
    full = [
        e for key, value in health.items() for e in events._health_value_errors(f"h.{events._name(key)}", key, value)
    ]
    assert events._check_health("h", health) == full


@pytest.mark.parametrize(
    ("vin", "refused"),
    [
        ("LNBSCB3F1PW123456", False),  # made for China: position 9 is the check digit, and it is right
        ("LNBSCB3F5PW123456", True),  # the same with a misread position 9
        ("1HGCM82633A004352", False),  # North America, right
        ("1HGCM82643A004352", True),
        ("WVWZZZ1JZ3W386752", False),  # a European maker's own position 9: no check digit to get wrong
    ],
)
def test_a_vin_check_digit_is_checked_where_the_standard_requires_one(vin, refused):
    assert (events.vin_problem(vin) is not None) is refused
