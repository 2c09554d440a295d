"""GB/T 34014 codes: the reference example, every rule with its position, and arbitrary input."""

import datetime as dt

import pytest
from battery_trace.protocol import battery_code as bc
from hypothesis import given
from hypothesis import strategies as st

EXAMPLE = "0RJPEA00HAU0AAG1C3000123"  # protocols.md §1


def test_reference_example_decodes_field_by_field():
    c = bc.parse(EXAMPLE)
    assert (c.manufacturer, c.product, c.chemistry, c.specification) == ("0RJ", "pack", "ternary", "A0")
    assert c.traceability == "0HAU0AA"
    assert c.production_date.value == dt.date(2026, 1, 12)
    assert c.serial == "3000123"
    assert not c.second_life and c.warnings == ()


def test_label_input_is_normalised():
    assert bc.parse(f"  {EXAMPLE.lower()}\n").code == EXAMPLE


@pytest.mark.parametrize(
    ("code", "position", "fragment"),
    [
        ("0RJXEA00HAU0AAG1C3000123", 4, "product type"),
        ("0RJPEA00HAU0A-G1C3000123", 14, "digits and upper-case"),
        ("0RJPEA00HAU0AAGD13000123", 16, "month"),
        ("0RJPEA00HAU0AAG103000123", 17, "day"),
        ("0RJPEA00HAU0AAG2Z3000123", 17, "day"),  # Z is a day in neither reading
        # February 31: 'Y' is 31 when I, O and Q are skipped and no day at all otherwise.
        ("0RJPEA00HAU0AAG2Y3000123", 17, "cannot exist"),
    ],
)
def test_each_rule_names_position_character_and_what_is_valid(code, position, fragment):
    with pytest.raises(bc.CodeError) as err:
        bc.parse(code)
    assert err.value.position == position
    assert fragment in str(err.value)
    assert f"position {position} ('{code[position - 1]}')" in str(err.value)
    assert "valid:" in str(err.value)


def test_a_reading_that_gives_no_real_date_is_dropped():
    # Day 'V' is 31 read consecutively (Feb 31 cannot exist) and 28 skipping I, O, Q: only Feb 28 remains.
    assert bc.parse("0RJPEA00HAU0AAG2V3000123").production_date.value == dt.date(2026, 2, 28)


def test_wrong_length_names_the_valid_lengths():
    with pytest.raises(bc.CodeError) as err:
        bc.parse(EXAMPLE[:-1])
    assert err.value.position == 0
    assert "24 characters" in str(err.value) and "17" in str(err.value)


def test_uncertain_points_are_warnings_not_errors():
    ambiguous_day = bc.parse("0RJPEA00HAU0AAG1K3000123")  # K = 20 (consecutive) or 19 (skipping I, O, Q)
    assert ambiguous_day.production_date.value is None
    assert ambiguous_day.production_date.candidates == (dt.date(2026, 1, 19), dt.date(2026, 1, 20))
    assert any("ambiguous" in w for w in ambiguous_day.warnings)
    rare_chemistry = bc.parse("0RJPGA00HAU0AAG1C3000123")
    assert rare_chemistry.chemistry == "LTO" and rare_chemistry.warnings
    late_year = bc.parse("0RJPEA00HAU0AAJ1C3000123")
    assert late_year.production_date.candidates and any("2027" in w for w in late_year.warnings)


def test_second_life_code_omits_traceability():
    c = bc.parse("0RJPBA0G1C3000123")
    assert c.second_life and c.traceability is None
    assert c.production_date.value == dt.date(2026, 1, 12) and c.serial == "3000123"


def test_links_between_pack_module_and_cell():
    pack = bc.parse(EXAMPLE)
    module = bc.parse("0RJMEA00HAU0AAG1C3000124")
    cell = bc.parse("0RJCEA00HAU0AAG1C3000125")
    assert bc.link_problems(pack, [module, cell]) == []
    assert bc.link_problems(module, [cell]) == []
    assert "cannot contain a pack" in bc.link_problems(module, [pack])[0]
    assert bc.link_problems(cell, [cell])  # itself, and a cell has no parts
    assert "twice" in bc.link_problems(pack, [module, module])[-1]


@given(st.text(max_size=40))
def test_any_text_parses_or_fails_with_a_code_error(text):
    try:
        c = bc.parse(text)
    except bc.CodeError as err:
        assert "valid:" in str(err)
    else:
        assert len(c.code) in (17, 24) and c.code == bc.normalise(text)


@given(st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=24, max_size=24))
def test_codes_of_the_right_alphabet_either_decode_a_real_date_or_name_a_position(code):
    try:
        c = bc.parse(code)
    except bc.CodeError as err:
        assert 1 <= err.position <= 24
    else:
        assert all(isinstance(d, dt.date) for d in c.production_date.candidates)
        assert c.production_date.candidates
