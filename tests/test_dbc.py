"""DBC-driven decoding with the shipped example DBC and a mapping; frames packed by hand by the stub."""

from __future__ import annotations

from pathlib import Path

import pytest
from battery_trace.agent.decoders import dbc
from battery_trace.agent.decoders.j1939 import CanFrame
from battery_trace.agent.readings import DecodeError, Health, Identity
from battery_trace.firmware_stubs import dbc_pack
from hypothesis import given
from hypothesis import strategies as st

DBC = Path(__file__).parent.parent / "configs" / "vendor-pack.dbc"
MAPPING = dbc.DbcMapping(
    health={
        "voltage_v": "PackStatus.PackVoltage",
        "current_a": "PackStatus.PackCurrent",
        "soc_pct": "PackStatus.StateOfCharge",
        "soh_pct": "PackStatus.StateOfHealth",
        "temp_max_c": "PackStatus.MaxTemperature",
        "temp_min_c": "PackStatus.MinTemperature",
        "cell_max_v": "PackCells.MaxCellVoltage",
        "cell_min_v": "PackCells.MinCellVoltage",
        "cycles": "PackCells.CycleCount",
    },
    code=dbc.CodeMapping("PackIdentity", "IdFrame", ("IdText0", "IdText1", "IdText2", "IdText3"), 7),
    charge_positive=False,
    faults="PackCells.FaultFlags",
)


def decoder() -> dbc.DbcDecoder:
    return dbc.DbcDecoder(dbc.load(DBC, MAPPING), MAPPING)


def readings(d: dbc.DbcDecoder, frames) -> list:
    out = []
    for ident, data in frames:
        name, values = d.decode(CanFrame(ident, data))
        out.extend(d.readings(name, values))
    return out


def test_health_and_a_code_spread_over_four_frames():
    pack = dbc_pack.VendorPack(faults=0b101)
    got = readings(decoder(), dbc_pack.broadcast(pack))
    health = Health()
    for r in got:
        if isinstance(r, Health):
            health = health.merged(r)
    assert health.voltage_v == 398.2 and health.current_a == -35.5  # discharging: negative in the agent
    assert (health.soc_pct, health.soh_pct, health.cycles) == (71.5, 96.0, 611)
    assert (health.cell_max_v, health.cell_min_v) == (3.342, 3.318)
    assert health.temps_c == (33.0, 29.0) and health.faults == ("dbc_fault_0", "dbc_fault_2")
    assert [r for r in got if isinstance(r, Identity)] == [Identity(source="can", code=pack.code)]


def test_a_lost_part_of_the_code_yields_no_code_until_a_full_round():
    pack = dbc_pack.VendorPack()
    parts = dbc_pack.identity(pack)
    d = decoder()
    assert not [r for r in readings(d, [parts[0], parts[1], parts[3]]) if isinstance(r, Identity)]
    assert [r.code for r in readings(d, parts) if isinstance(r, Identity)] == [pack.code]


def test_unknown_frames_and_short_frames():
    d = decoder()
    assert d.decode(CanFrame(0x123, b"\x00")) is None
    with pytest.raises(DecodeError) as err:
        d.decode(CanFrame(dbc_pack.STATUS_ID, b"\x01\x02"))
    assert err.value.reason == "bad_frame"


def test_a_mapping_that_names_a_missing_signal_is_refused_with_the_choices():
    bad = dbc.DbcMapping(health={"soc_pct": "PackStatus.SOC"})
    with pytest.raises(dbc.DbcError, match=r"no signal 'PackStatus.SOC'.*PackStatus.StateOfCharge"):
        dbc.load(DBC, bad)


def test_a_file_that_is_not_a_dbc(tmp_path):
    path = tmp_path / "x.dbc"
    path.write_text("BO_ this is not right")
    with pytest.raises(dbc.DbcError, match="not a DBC file"):
        dbc.load(path, dbc.DbcMapping())


@given(st.sampled_from([dbc_pack.STATUS_ID, dbc_pack.CELLS_ID, dbc_pack.IDENTITY_ID]), st.binary(max_size=8))
def test_arbitrary_payloads_decode_or_raise_decode_error(ident, data):
    d = decoder()
    try:
        decoded = d.decode(CanFrame(ident, data))
    except DecodeError:
        return
    assert all(isinstance(r, Health | Identity) for r in d.readings(*decoded))
