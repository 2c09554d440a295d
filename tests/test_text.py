"""The contract's text rule, and device-supplied text shown escaped wherever a person reads it."""

from __future__ import annotations

import pytest
from battery_trace.protocol import events
from battery_trace.protocol.text import control_problem, escaped, shown
from hypothesis import given
from hypothesis import strategies as st

from tests.world import T0

PACK = "0RJPEA00HAU0AAG1C3000123"
CONTROLS = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + ["\ud800", "\udfff"]


@pytest.mark.parametrize("char", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
def test_every_control_character_and_surrogate_breaks_the_rule(char: str) -> None:
    problem = control_problem(f"ab{char}c")
    assert problem is not None and "position 3" in problem and repr(char) in problem


@pytest.mark.parametrize("text", ["Zhang San 张三", "\u202eevil\u202c", "ÄÖÜ", "cell 12 low (≈3.1 V)"])
def test_printable_and_format_characters_are_text(text: str) -> None:
    assert control_problem(text) is None


@pytest.mark.parametrize(
    ("event_type", "fields", "path"),
    [
        ("health", {"code": f"{PACK[:5]}\x00{PACK[6:]}", "health": {"soc_pct": 1}}, "code"),
        ("health", {"code": PACK, "health": {"soc_pct": 1, "faults": ["ok", "b\x7fad"]}}, "health.faults[1]"),
        ("maintenance", {"code": PACK, "action": "repair", "findings": "line one\nline two"}, "findings"),
        ("handed_over", {"code": PACK, "from_entity": "A\x85", "to_entity": "B", "to_role": "recycler"}, "from_entity"),
        ("vehicle_scrapped", {"vin": "LNBSCB3F1PW123456", "codes": [PACK, "\x00"]}, "codes[1]"),
    ],
)
def test_events_refuse_control_characters_in_every_text_naming_the_field(event_type, fields, path) -> None:
    errors = events.body_errors(event_type, "label", fields)
    assert [e.path for e in errors] == [path]
    assert "control characters" in errors[0].message


def test_a_field_name_a_device_chose_is_shown_escaped_in_the_error() -> None:
    m = {"v": 1, "device": "gw-1", "seq": 1, "prev": bytes(32), "time": T0, "type": "health", "source": "label"}
    m |= {"code": PACK, "health": {"soc_pct": 1, "\u202egnp": 1}, "\x00name": 1, "A" * 500: 2}
    message = str(events.EventError(events.event_errors(m)))
    assert "'\\x00name': is not a field of 'health'" in message
    assert "health.'\\u202egnp': unknown health field" in message
    assert "(500 characters)" in message and "A" * 81 not in message
    assert control_problem(message) is None and "\u202e" not in message


@given(st.text())
def test_escaped_text_is_valid_for_every_backend_and_keeps_printable_text(text: str) -> None:
    """Escaped text holds nothing a backend refuses or a reader cannot see; printable text is kept."""
    out = escaped(text)
    assert control_problem(out) is None
    out.encode("utf-8")  # no surrogate left: PostgreSQL and every terminal take it
    if text.isprintable():  # what escaped() escapes (controls, bidi, zero-width, separators) is not
        assert out == text


@given(st.one_of(st.text(), st.binary(), st.integers(), st.floats(), st.lists(st.integers())))
def test_shown_is_bounded_and_printable_whatever_the_value(value) -> None:
    out = shown(value)
    assert len(out) < 140 and control_problem(out) is None and out.isprintable()


def test_huge_integers_are_summarised_not_spelled_out() -> None:
    assert shown(2**100_000) == "an integer of 100001 bits"
