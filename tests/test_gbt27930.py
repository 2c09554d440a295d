"""GB/T 27930 and J1939 TP: the reference's examples, a whole charging session from the stub, every
TP edge case a passive listener must survive, and arbitrary frames."""

from __future__ import annotations

import random

import pytest
from battery_trace.agent.decoders import gbt27930
from battery_trace.agent.decoders.j1939 import CanFrame, J1939Id, Message, TransportReassembler
from battery_trace.agent.readings import DecodeError, Health, Identity
from battery_trace.firmware_stubs import gbt27930_bms as stub
from hypothesis import given
from hypothesis import strategies as st

# protocols.md §2, verbatim
REFERENCE = """
0x1CEC56F4  10 31 00 07 FF 00 02 00
0x1CECF456  11 07 01 FF FF 00 02 00
0x1CEB56F4  01 01 01 00 03 DC 05 B0
0x1CEB56F4  02 0D 43 41 54 4C 45 23
0x1CEB56F4  03 01 00 27 05 11 00 01
0x1CEB56F4  04 00 01 FF 4C 4E 42 53
0x1CEB56F4  05 43 42 33 46 35 50 57
0x1CEB56F4  06 31 32 33 34 35 36 FF
0x1CEB56F4  07 FF FF FF FF FF FF FF
0x1CECF456  13 31 00 07 FF 00 02 00
0x181356F4  0B 51 02 4D 08 00 D0
"""


def frames_of(text: str, step: float = 0.01) -> list[CanFrame]:
    out = []
    for i, line in enumerate(text.strip().splitlines()):
        ident, *data = line.split()
        out.append(CanFrame(int(ident, 16), bytes.fromhex("".join(data)), i * step))
    return out


def run(frames: list[CanFrame]) -> tuple[list, list[DecodeError]]:
    tp = TransportReassembler()
    decoded, errors = [], []
    for f in frames:
        for item in tp.feed(f):
            if isinstance(item, DecodeError):
                errors.append(item)
            else:
                try:
                    d = gbt27930.decode(item)
                except DecodeError as exc:
                    errors.append(exc)
                    continue
                if d is not None:
                    decoded.append(d)
    return decoded, errors


def stub_frames(frames: list[stub.Frame], step: float = 0.01) -> list[CanFrame]:
    return [CanFrame(f.arbitration_id, f.data, i * step) for i, f in enumerate(frames)]


def test_identifier_of_the_reference_bsm():
    ident = J1939Id.parse(0x181356F4)
    assert (ident.priority, ident.pgn, ident.destination, ident.source) == (6, 0x1300, 0x56, 0xF4)
    assert ident.to_id() == 0x181356F4


def test_reference_brm_over_rts_cts_and_bsm():
    (brm, bsm), errors = run(frames_of(REFERENCE))
    assert errors == []
    assert brm.name == "BRM" and brm.fields == {
        "protocol_version": "1.1",
        "battery_type": "lfp",
        "rated_capacity_ah": 150.0,
        "rated_voltage_v": 350.4,
        "edition": "2015",
        "manufacturer": "CATL",
        "pack_serial": "00012345",
        "production_date": "2024-05-17",
        "charge_count": 256,
        "ownership": "vehicle_owned",
        "vin": "LNBSCB3F5PW123456",  # a reference capture: the bytes as recorded, check digit and all
    }
    assert bsm.fields["max_cell_number"] == 12 and bsm.fields["max_temperature_c"] == 31
    assert (bsm.fields["max_temperature_probe"], bsm.fields["min_temperature_c"]) == (3, 27)
    assert bsm.fields["min_temperature_probe"] == 9 and bsm.fields["charge_allowed"] is True
    identity = next(r for r in gbt27930.readings(brm) if isinstance(r, Identity))
    assert identity.secondary == "gbt27930:CATL:00012345:2024-05-17"


def test_reference_bcs_values_and_reading_sign():
    decoded = gbt27930.decode(Message(0x1100, 0xF4, 0x56, bytes.fromhex("C60DEB0A55213F2F00"), 0))
    assert decoded.fields == {
        "voltage_v": 352.6,
        "current_a": -120.5,
        "max_cell_voltage_v": 3.41,
        "max_cell_group": 2,
        "soc_pct": 63,
        "remaining_minutes": 47,
    }
    (health,) = gbt27930.readings(decoded)
    assert health.current_a == 120.5  # the agent's convention: positive while charging


def test_a_whole_charging_session_from_the_stub():
    pack = stub.Pack(soc_pct=40, cells_v=[3.3] * 96)
    decoded, errors = run(stub_frames(stub.charging_session(pack, rounds=5)))
    assert errors == []
    names = [d.name for d in decoded]
    assert names[:3] == ["BHM", "BRM", "BCP"] and names[-2:] == ["BST", "BSD"]
    assert names.count("BCS") == names.count("BMV") == 5
    socs = [d.fields["soc_pct"] for d in decoded if d.name == "BCS"]
    assert socs == [40, 42, 44, 46, 48]
    bmv = next(d for d in decoded if d.name == "BMV")
    assert len(bmv.fields["cells_v"]) == 96 and bmv.fields["cell_groups"][0] == 1
    assert next(d for d in decoded if d.name == "BMT").fields["temperatures_c"] == [27, 29, 31, 30]


def test_2011_brm_and_a_single_frame_brm_are_tolerated():
    old = gbt27930.decode(Message(0x0200, 0xF4, 0x56, stub.brm(stub.Pack(edition="2011")), 0))
    assert old.fields["edition"] == "2011" and old.fields["vin"] == "LNBSCB3F1PW123456"
    short = gbt27930.decode(Message(0x0200, 0xF4, 0x56, stub.brm(stub.Pack())[:8], 0))
    assert short.fields["rated_voltage_v"] == 350.4 and "manufacturer" not in short.fields


def test_absent_optional_fields_are_absent():
    data = bytearray(stub.brm(stub.Pack()))
    data[8:16] = b"\xff" * 8  # manufacturer and serial not sent
    data[16:19] = b"\x00\x00\x00"
    fields = gbt27930.decode(Message(0x0200, 0xF4, 0x56, bytes(data), 0)).fields
    assert fields["manufacturer"] is None and fields["pack_serial"] is None and "production_date" not in fields


def _transfer(name: str, payload: bytes, source: int = 0xF4, t0: float = 0.0) -> list[CanFrame]:
    announce, dts = stub.segment(name, payload, source, 0x56)
    return stub_frames([announce, *dts])


def test_abort_mid_transfer_drops_it_and_the_next_one_decodes():
    frames = _transfer("BMV", stub.bmv(stub.Pack()))
    aborted = [*frames[:5], CanFrame(stub.abort("BMV", 0x56, 0xF4).arbitration_id, stub.abort("BMV", 0x56, 0xF4).data)]
    decoded, errors = run(aborted + frames)
    assert [e.reason for e in errors] == ["tp_aborted"] and [d.name for d in decoded] == ["BMV"]


def test_lost_packet_times_out_and_repeated_packets_are_ignored():
    frames = _transfer("BMV", stub.bmv(stub.Pack()))
    lost = [f for i, f in enumerate(frames) if i != 3]
    late = CanFrame(0x181356F4, stub.bsm(stub.Pack()), lost[-1].timestamp + 2.0)
    decoded, errors = run([*lost, late])
    assert "tp_timeout" in [e.reason for e in errors] and [d.name for d in decoded] == ["BSM"]
    repeated = [*frames[:4], frames[3], *frames[4:]]
    decoded, errors = run(repeated)
    assert [e.reason for e in errors] == ["tp_repeated"] and [d.name for d in decoded] == ["BMV"]


def test_a_new_rts_mid_transfer_restarts_it():
    first = _transfer("BMV", stub.bmv(stub.Pack()))
    second = _transfer("BRM", stub.brm(stub.Pack()))
    decoded, errors = run([*first[:4], *second])
    assert [e.reason for e in errors] == ["tp_restarted"] and [d.name for d in decoded] == ["BRM"]


def test_interleaved_transfers_from_two_sources():
    a = _transfer("BMV", stub.bmv(stub.Pack(cells_v=[3.3] * 20)), source=0xF4)
    b = _transfer("BMV", stub.bmv(stub.Pack(cells_v=[3.4] * 20)), source=0xF5)
    mixed = [f for pair in zip(a, b, strict=True) for f in pair]
    decoded, errors = run(mixed)
    assert errors == []
    assert sorted((d.source, d.fields["cells_v"][0]) for d in decoded) == [(0xF4, 3.3), (0xF5, 3.4)]


def test_bam_is_accepted():
    announce, dts = stub.segment("BMV", stub.bmv(stub.Pack(cells_v=[3.31] * 10)), 0xF4, 0x56, broadcast=True)
    decoded, errors = run(stub_frames([announce, *dts]))
    assert errors == [] and decoded[0].fields["cells_v"] == [3.31] * 10


def test_orphan_packets_and_bad_announcements_are_named():
    decoded, errors = run(
        [
            CanFrame(0x1CEB56F4, bytes.fromhex("0101010003DC05B0")),
            CanFrame(0x1CEC56F4, bytes.fromhex("10FF0F03FF000200")),
        ]
    )
    assert decoded == [] and [e.reason for e in errors] == ["tp_orphan", "tp_bad_announce"]


def test_malformed_bms_messages_are_decode_errors():
    with pytest.raises(DecodeError) as err:
        gbt27930.decode(Message(0x1100, 0xF4, 0x56, b"\x01\x02", 0))
    assert err.value.reason == "short_message"
    with pytest.raises(DecodeError) as err:
        gbt27930.decode(Message(0x4400, 0xF4, 0x56, b"\x01", 0))
    assert err.value.reason == "unknown_pgn"


def test_bus_faults_never_crash_and_most_of_a_session_survives():
    rng = random.Random(7)
    clean = stub.charging_session(stub.Pack(), rounds=20)
    noisy = stub.with_faults(clean, rng, lose=0.02, repeat=0.05, flip=0.02, noise=0.05)
    decoded, errors = run(stub_frames(noisy))
    assert sum(d.name == "BCS" for d in decoded) >= 10
    assert all(isinstance(e, DecodeError) and e.reason for e in errors)


@given(st.lists(st.tuples(st.integers(0, 2**29 - 1), st.binary(max_size=8)), max_size=60))
def test_arbitrary_frames_give_messages_or_decode_errors(raw):
    frames = [CanFrame(i, d, n * 0.01) for n, (i, d) in enumerate(raw)]
    decoded, errors = run(frames)
    assert all(isinstance(e, DecodeError) for e in errors)
    for d in decoded:
        assert isinstance(gbt27930.readings(d), list)


@given(st.sampled_from(sorted(gbt27930.MESSAGES)), st.binary(max_size=60))
def test_every_bms_message_decodes_or_names_the_problem(pgn, data):
    try:
        decoded = gbt27930.decode(Message(pgn, 0xF4, 0x56, data, 0))
    except DecodeError as exc:
        assert exc.reason
    else:
        assert all(isinstance(r, Health | Identity) for r in gbt27930.readings(decoded))
