"""JBD decoding: the vendor's example, stream framing with resynchronisation, and arbitrary bytes."""

import pytest
from battery_trace.agent.decoders import jbd
from battery_trace.agent.readings import DecodeError, Health, Identity
from battery_trace.firmware_stubs import jbd_bms
from hypothesis import given
from hypothesis import strategies as st

# protocols.md §3, from the vendor's protocol document
EXAMPLE = bytes.fromhex(
    "DD 03 00 1B 17 00 00 00 02 D0 03 E8 00 00 20 78 00 00 00 00 00 00 10 48 03 0F 02 0B 76 0B 82 FB FF 77"
)


def frames(data: bytes) -> list:
    return jbd.reader().feed(data)


def test_read_requests_match_the_reference():
    assert jbd.read_request(jbd.BASIC).hex() == "dda50300fffd77"
    assert jbd.read_request(jbd.CELLS).hex() == "dda50400fffc77"
    assert jbd.read_request(jbd.MODEL).hex() == "dda50500fffb77"


def test_vendor_example_decodes_to_the_documented_values():
    (frame,) = frames(EXAMPLE)
    h = jbd.decode(frame)
    assert h.voltage_v == 58.88 and h.current_a == 0.0
    assert (h.remaining_ah, h.nominal_ah, h.cycles) == (7.2, 10.0, 0)
    assert h.soc_pct == 72 and h.temps_c == (20.3, 21.5) and h.faults == ()


def test_stub_frames_decode_to_the_stub_state():
    state = jbd_bms.PackState(current_a=-12.34, protection=0b101, cells_mv=[3300, 3312, 3291])
    basic = jbd.decode(frames(jbd_bms.response(0x03, jbd_bms.basic_payload(state)))[0])
    assert basic.current_a == -12.34 and basic.faults == ("cell_overvoltage", "pack_overvoltage")
    assert basic.temps_c == tuple(state.temps_c)
    cells = jbd.decode(frames(jbd_bms.response(0x04, jbd_bms.cells_payload(state)))[0])
    assert cells == Health(cells_v=(3.3, 3.312, 3.291), cell_min_v=3.291, cell_max_v=3.312)
    model = jbd.decode(frames(jbd_bms.response(0x05, b"SP04S034"))[0])
    assert model == Identity(source="bms", details={"bms_model": "SP04S034"})  # every such pack says it


def test_stream_resynchronises_after_garbage_truncation_and_bad_checksums():
    truncated = EXAMPLE[:20]
    bad_sum = EXAMPLE[:-3] + b"\x00\x00\x77"
    out = frames(b"\x77\x13garbage" + truncated + bad_sum + EXAMPLE + b"\xdd")
    good = [f for f in out if isinstance(f, jbd.Frame)]
    errors = {e.reason for e in out if isinstance(e, DecodeError)}
    assert len(good) == 1 and jbd.decode(good[0]).voltage_v == 58.88
    assert {"garbage", "bad_checksum"} <= errors


def test_frames_split_across_reads_are_reassembled():
    reader = jbd.reader()
    got = [item for byte in EXAMPLE for item in reader.feed(bytes([byte]))]
    assert len(got) == 1 and isinstance(got[0], jbd.Frame)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"\x00" * 10, "short_payload"), (EXAMPLE[4:-3][:22] + b"\x05", "short_payload")],
)
def test_short_basic_payloads_are_named(payload, reason):
    with pytest.raises(DecodeError) as err:
        jbd.decode_basic(payload)
    assert err.value.reason == reason


def test_bms_error_status_and_odd_cell_payloads_are_refused():
    with pytest.raises(DecodeError, match="status 128"):
        jbd.decode(jbd.Frame(0x03, 0x80, b""))
    with pytest.raises(DecodeError) as err:
        jbd.decode_cells(b"\x0c\xe4\x0c")
    assert err.value.reason == "bad_length"


@given(st.lists(st.binary(max_size=80), max_size=8))
def test_arbitrary_bytes_yield_only_checked_frames_or_named_errors(chunks):
    reader = jbd.reader()
    for chunk in chunks:
        for item in reader.feed(chunk):
            assert isinstance(item, jbd.Frame | DecodeError)
            if isinstance(item, DecodeError):
                assert item.reason in {"garbage", "bad_end", "unknown_register", "bad_checksum"}


@given(st.sampled_from([0x03, 0x04, 0x05]), st.binary(max_size=255))
def test_any_checksummed_payload_decodes_or_raises_decode_error(register, payload):
    (frame,) = frames(jbd_bms.response(register, payload))
    try:
        reading = jbd.decode(frame)
    except DecodeError as err:
        assert err.reason
    else:
        assert isinstance(reading, Health | Identity)


@given(st.binary(max_size=200).map(lambda b: b.replace(b"\xdd", b"")))
def test_a_frame_after_noise_is_always_found(noise):
    good = [f for f in frames(noise + EXAMPLE) if isinstance(f, jbd.Frame)]
    assert len(good) == 1 and good[0].payload == EXAMPLE[4:-3]
