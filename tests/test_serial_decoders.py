"""Daly frames and code-label scanner lines: reference examples, multi-frame answers, resync, arbitrary bytes."""

from __future__ import annotations

import pytest
from battery_trace.agent.decoders import daly, scanner, station
from battery_trace.agent.readings import DecodeError, Health, Identity
from battery_trace.firmware_stubs import daly_bms
from hypothesis import given
from hypothesis import strategies as st

EXAMPLE_ANSWER = bytes.fromhex("A5 01 90 08 02 FC 00 00 75 A1 00 00 52".replace(" ", ""))


def frames(data: bytes) -> list:
    return [f for f in daly.reader().feed(data) if isinstance(f, daly.Frame)]


def test_reference_request_and_answer():
    assert daly.request(daly.PACK).hex() == "a540900800000000000000007d"
    (frame,) = frames(EXAMPLE_ANSWER)
    assert daly.decode_frame(frame) == {
        "voltage_v": 76.4,
        "acquisition_voltage_v": 0.0,
        "current_a": 11.3,
        "soc_pct": 0.0,
    }
    assert daly.decode_frame(frame, charge_positive=False)["current_a"] == -11.3


def test_every_command_of_the_stub_decodes_to_its_state():
    pack = daly_bms.DalyPack(cells_mv=[3301, 3305, 3299, 3310, 3300], temps_c=[21, 23], cycles=42)
    single = {c: daly.decode_frame(frames(daly_bms.answers(c, pack)[0])[0]) for c in (0x91, 0x92, 0x93, 0x94)}
    assert single[0x91] == {"max_cell_voltage_v": 3.31, "max_cell": 4, "min_cell_voltage_v": 3.299, "min_cell": 3}
    assert (single[0x92]["max_temperature_c"], single[0x92]["min_temperature_c"]) == (23, 21)
    assert single[0x93]["remaining_ah"] == 55.0 and single[0x94]["cycles"] == 42
    cells = [daly.decode_frame(f) for f in frames(b"".join(daly_bms.answers(0x95, pack)))]
    assert daly.assemble(0x95, cells, expected=2, count=5) == {"cells_v": [3.301, 3.305, 3.299, 3.31, 3.3]}
    temps = [daly.decode_frame(f) for f in frames(b"".join(daly_bms.answers(0x96, pack)))]
    assert daly.assemble(0x96, temps, count=2)["temperatures_c"] == [21, 23]  # not the -40 padding
    code = [daly.decode_frame(f) for f in frames(b"".join(daly_bms.answers(0x57, pack)))]
    assembled = daly.assemble(0x57, code)
    assert assembled == {"code": "0RJPBA00HAU0AAG1C3000777"}
    (identity,) = daly.readings(0x57, assembled)
    assert identity == Identity(source="bms", code="0RJPBA00HAU0AAG1C3000777")


def test_missing_parts_of_a_multi_frame_answer_are_named():
    parts = [daly.decode_frame(f) for f in frames(b"".join(daly_bms.answers(0x95, daly_bms.DalyPack())))]
    with pytest.raises(DecodeError) as err:
        daly.assemble(0x95, parts[:1] + parts[2:], expected=len(parts))
    assert err.value.reason == "missing_frames"


def test_stream_resynchronises_and_checks_every_sum():
    broken = bytearray(EXAMPLE_ANSWER)
    broken[12] ^= 0xFF
    out = daly.reader().feed(b"\x00\xa5\x01" + bytes(broken) + EXAMPLE_ANSWER[:7])
    reader = daly.reader()
    items = reader.feed(b"\x00\xa5\x01" + bytes(broken) + EXAMPLE_ANSWER[:7]) + reader.feed(EXAMPLE_ANSWER[7:])
    assert [i for i in items if isinstance(i, daly.Frame)] == frames(EXAMPLE_ANSWER)
    assert {e.reason for e in items if isinstance(e, DecodeError)} >= {"garbage", "bad_checksum"}
    assert not [i for i in out if isinstance(i, daly.Frame)]


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_arbitrary_bytes_yield_checked_frames_or_named_errors(chunks):
    reader = daly.reader()
    for chunk in chunks:
        for item in reader.feed(chunk):
            if isinstance(item, daly.Frame):
                try:
                    fields = daly.decode_frame(item)
                except DecodeError as exc:
                    assert exc.reason == "unknown_command"
                else:
                    assert isinstance(fields, dict)
            else:
                assert item.reason in {"garbage", "bad_length", "bad_checksum"}


@given(st.sampled_from([0x90, 0x91, 0x92, 0x93, 0x94, 0x95, 0x96, 0x98, 0x57]), st.binary(min_size=8, max_size=8))
def test_any_checked_frame_of_a_known_command_decodes(command, data):
    fields = daly.decode_frame(daly.Frame(0x01, command, data))
    if command not in daly.MULTI_FRAME:
        assert all(isinstance(r, Health | Identity) for r in daly.readings(command, fields))


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"])
def test_scanner_lines_end_with_cr_lf_or_crlf(ending):
    reader = scanner.label_reader()
    text = b"0rjpea00hau0aag1c3000123" + ending + b"  0RJPEA00HAU0AAG1C3000124 " + ending
    half = len(text) // 2
    got = reader.feed(text[:half]) + reader.feed(text[half:])
    assert [i.code for i in got] == ["0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124"]
    assert all(i.source == "label" for i in got)


def test_scanner_drops_overlong_and_non_ascii_lines():
    reader = scanner.label_reader()
    got = reader.feed(b"x" * 300 + b"\n" + "Ä".encode() + b"\n" + b"0RJPEA00HAU0AAG1C3000123\n")
    assert [g.reason for g in got if isinstance(g, DecodeError)] == ["line_too_long", "not_ascii"]
    assert got[-1].code == "0RJPEA00HAU0AAG1C3000123"


@given(st.binary(max_size=300))
def test_scanner_survives_arbitrary_bytes(data):
    for item in scanner.label_reader().feed(data):
        assert isinstance(item, Identity | DecodeError)


@pytest.mark.parametrize("protocol", ["jbd", "daly"])
def test_pollers_get_through_a_noisy_line(tmp_path, protocol):
    """Noise, flipped bits, cut frames and wrong checksums: readings still arrive, the rest is counted."""
    import asyncio

    from battery_trace.agent.sources.serial_port import SerialSettings, serial_source
    from battery_trace.firmware_stubs.jbd_bms import JbdBms
    from battery_trace.firmware_stubs.pty_link import PtyLink
    from battery_trace.firmware_stubs.serial_stub import Faults

    faults = Faults(noise=0.3, bit_flip=0.15, truncate=0.1, bad_checksum=0.1, silent=0.05)
    link = PtyLink(tmp_path / "bms")
    stub = JbdBms(link, faults=faults, seed=3) if protocol == "jbd" else daly_bms.DalyBms(link, faults=faults, seed=3)
    stub.start()
    readings = []
    source = serial_source(
        1,
        SerialSettings(str(link.path), protocol, poll_interval_s=0.01, timeout_s=0.15),
        lambda slot, r: readings.append(r),
    )

    async def scenario() -> None:
        task = asyncio.create_task(source.run())
        for _ in range(150):
            if sum(1 for r in readings if isinstance(r, Health) and r.voltage_v) >= 5:
                break
            await asyncio.sleep(0.05)
        task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        stub.stop()
        link.close()
    voltages = {r.voltage_v for r in readings if isinstance(r, Health) and r.voltage_v}
    assert voltages == {52.8 if protocol == "jbd" else 76.4}  # a damaged frame never yields a wrong value
    assert sum(v for k, v in source.counters.items() if k.startswith("bad_frame:")) > 0


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("VEHICLE lnbscb3f1pw123456", station.StationCommand("VEHICLE", vin="LNBSCB3F1PW123456")),
        ("out 3", station.StationCommand("OUT", slot=3)),
        ("DONE", station.StationCommand("DONE")),
        ("   ", "empty"),  # found by the fuzzer: a blank line once raised IndexError
        ("OUT three", "bad_slot"),
        ("REPLACE 0RJPEA00HAU0AAG1C3000124 123", "bad_vin"),
        ("REPLACE 0RJPEA00HAU0AAG1C3000124 LNBSCB3F5PW123456", "bad_vin"),  # wrong check digit
        ("OUT 2*7A", "bad_checksum"),
    ],
)
def test_station_lines_parse_or_name_the_problem(line, expected):
    result = station.parse(line)
    assert result == expected if isinstance(expected, station.StationCommand) else result.reason == expected


@pytest.mark.parametrize("vin", ["123", "LNBSCB3F5PW123456", "LNBSCB3F1PW123456 X"])
def test_a_vehicle_line_with_an_untrustworthy_vin_still_says_a_vehicle_came(vin):
    """The bay must know a vehicle came in (its lines are kept apart from the previous one's), not who."""
    result = station.parse(f"VEHICLE {vin}")
    assert isinstance(result, station.StationCommand) and result.vin is None and result.text


def test_a_checksummed_line_is_taken_only_when_its_checksum_matches():
    assert station.parse(f"OUT 2*{station.checksum('OUT 2')}") == station.StationCommand("OUT", slot=2)
    assert station.parse("OUT 2*00").reason == "bad_checksum"


@given(st.text(max_size=200))
def test_any_station_line_is_a_command_or_a_decode_error(line):
    assert isinstance(station.parse(line), station.StationCommand | DecodeError)
