"""Fuzz targets for every parser that meets outside bytes, and a runner that looks for new crashers.

Each target takes arbitrary bytes and returns normally when the parser either parsed them or refused
them with its own, documented error; anything else (another exception, a hang, a crash) is a bug.
``tests/corpus/<target>/`` holds the seeds and every odd input found so far; ``tests/test_corpus.py``
replays them all in CI.

Looking for new ones (coverage-guided with atheris when it is installed, else hypothesis):

    .venv/bin/python -m tests.fuzzing                     # every target, 30 s each
    .venv/bin/python -m tests.fuzzing envelope --seconds 600
    .venv/bin/pip install atheris                         # optional: coverage-guided (libFuzzer)

A crasher is written to ``tests/corpus/<target>/crash-<sha1>``; fix the parser and keep the file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from battery_trace.agent import config as agent_config
from battery_trace.agent.decoders import daly, dbc, gbt27930, jbd, scanner, station
from battery_trace.agent.decoders.j1939 import CanFrame, TransportReassembler
from battery_trace.agent.readings import DecodeError
from battery_trace.protocol import battery_code, cbor, envelope, events, keys, receipts, topics
from battery_trace.server import config as server_config
from battery_trace.server import mqtt_packets, verify
from battery_trace.server.records import Accepted, KeyRecord, Rejected

from battery_trace.settings import ConfigError

CORPUS = Path(__file__).resolve().parent / "corpus"
DEVICE_KEY = keys.PrivateKey(bytes(range(32)))  # fixed, so corpus files stay meaningful across runs
SERVER_KEY = keys.PrivateKey(bytes(range(32, 64)))
NOW = 1_795_000_000.0


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def fuzz_cbor(data: bytes) -> None:
    """The strict decoder refuses only with CborError, and the fast paths (the C form check, cbor2)
    return exactly what it returns, in both modes: repr tells -0.0 from 0.0 and True from 1."""
    for deterministic in (False, True):
        outcomes = []
        for decode in (cbor.decode_strict, cbor.decode):
            try:
                outcomes.append(repr(decode(data, deterministic=deterministic)))
            except cbor.CborError:
                outcomes.append("refused")
        assert outcomes[0] == outcomes[1], f"strict {outcomes[0]} but fast {outcomes[1]} for {data.hex()}"


def fuzz_envelope(data: bytes) -> None:
    """Decode, verify, and read the payload as an event: what every verifier of a record does."""
    try:
        env = envelope.verify(data, DEVICE_KEY.public)
    except envelope.EnvelopeError:
        with contextlib.suppress(envelope.EnvelopeError):
            envelope.decode(data)
        return
    with contextlib.suppress(events.EventError):
        events.decode(env.payload)


def fuzz_event(data: bytes) -> None:
    with contextlib.suppress(events.EventError):
        events.decode(data)


def fuzz_receipt(data: bytes) -> None:
    with contextlib.suppress(receipts.ReceiptError):
        receipts.verify(data, [SERVER_KEY.public], "station-1", {DEVICE_KEY.public.kid})


def fuzz_battery_code(data: bytes) -> None:
    with contextlib.suppress(battery_code.CodeError):
        battery_code.parse(_text(data))


def fuzz_topic(data: bytes) -> None:
    with contextlib.suppress(topics.TopicError):
        topics.parse(_text(data))


def fuzz_intake(data: bytes) -> None:
    """The collector's verification of one message: it must answer Accepted or Rejected, never raise."""
    public = DEVICE_KEY.public
    record = KeyRecord(
        public.kid,
        "station-1",
        "swap_operator",
        public,
        state="active",
        valid_from=NOW - 86400,
        valid_until=None,
        revoked_at=None,
    )
    parsed = verify.parse("bt/v1/station-1/events", data, 65536)
    if isinstance(parsed, verify.Parsed):
        outcome = verify.check(parsed, record if parsed.kid == record.kid else None, NOW)
        assert isinstance(outcome, Accepted | Rejected), outcome
    else:
        assert isinstance(parsed, Rejected), parsed


def fuzz_mqtt(data: bytes) -> None:
    """What a broker sends the collector: framed by the splitter, each packet decoded as the link does."""
    try:
        for first, body in mqtt_packets.Splitter(4096).feed(data):
            kind = first >> 4
            if kind == mqtt_packets.PUBLISH:
                mqtt_packets.decode_publish(first, body)
            elif kind == mqtt_packets.CONNACK:
                mqtt_packets.decode_connack(body)
            elif kind in (mqtt_packets.PUBACK, mqtt_packets.SUBACK):
                mqtt_packets.decode_ack(mqtt_packets.NAMES[kind], body)
            elif kind == mqtt_packets.DISCONNECT:
                mqtt_packets.decode_disconnect(body)
    except mqtt_packets.PacketError:
        pass


def fuzz_jbd(data: bytes) -> None:
    for item in jbd.reader().feed(data):
        if isinstance(item, jbd.Frame):
            with contextlib.suppress(DecodeError):
                jbd.decode(item)


def fuzz_daly(data: bytes) -> None:
    """Frames, each decoded, then the frames of each answer assembled into readings (as the poller does)."""
    answers: dict[int, list[dict]] = {}
    for item in daly.reader().feed(data):
        if isinstance(item, daly.Frame):
            try:
                fields = daly.decode_frame(item)
            except DecodeError:
                continue
            answers.setdefault(item.command, []).append(fields)
    for command, frames in answers.items():
        with contextlib.suppress(DecodeError):
            if command in (daly.CELLS, daly.TEMPS, daly.CODE):
                daly.readings(command, daly.assemble(command, frames))
            else:
                daly.readings(command, frames[0])


def fuzz_scanner(data: bytes) -> None:
    scanner.label_reader().feed(data)


def fuzz_station(data: bytes) -> None:
    for line in _text(data).splitlines():
        station.parse(line)


def fuzz_gbt27930(data: bytes) -> None:
    """CAN frames cut from the bytes (4 bytes of identifier, a length nibble, up to 8 data bytes), through
    J1939 transport reassembly and the GB/T 27930 decoder."""
    tp = TransportReassembler()
    i, t = 0, 0.0
    while i + 5 <= len(data):
        ident = int.from_bytes(data[i : i + 4], "big") & 0x1FFFFFFF
        n = data[i + 4] % 9
        frame = CanFrame(ident, bytes(data[i + 5 : i + 5 + n]), t)
        i, t = i + 5 + n, t + 0.01
        for item in tp.feed(frame):
            if not isinstance(item, DecodeError):
                with contextlib.suppress(DecodeError):
                    decoded = gbt27930.decode(item)
                    if decoded is not None:
                        gbt27930.readings(decoded)


@functools.cache
def _dbc_decoder() -> tuple[dbc.DbcDecoder, tuple[int, ...]]:
    from battery_trace.firmware_stubs import dbc_pack

    from tests.test_dbc import DBC, MAPPING

    ids = (dbc_pack.STATUS_ID, dbc_pack.CELLS_ID, dbc_pack.IDENTITY_ID, 0x123)
    return dbc.DbcDecoder(dbc.load(DBC, MAPPING), MAPPING), ids


def fuzz_dbc(data: bytes) -> None:
    """A vendor pack's frames through the shipped DBC: one byte picks the frame (three known, one
    unknown), one byte its length, then the data."""
    decoder, ids = _dbc_decoder()
    i = 0
    while i + 2 <= len(data):
        n = data[i + 1] % 9
        frame = CanFrame(ids[data[i] % len(ids)], bytes(data[i + 2 : i + 2 + n]))
        i += 2 + n
        try:
            decoded = decoder.decode(frame)
        except DecodeError:
            continue
        if decoded is not None:
            decoder.readings(*decoded)


def _config(loader: Callable[[Path], object]) -> Callable[[bytes], None]:
    def target(data: bytes) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "fuzz.toml"
            path.write_bytes(data)
            with contextlib.suppress(ConfigError):
                loader(path)

    return target


TARGETS: dict[str, Callable[[bytes], None]] = {
    "cbor": fuzz_cbor,
    "envelope": fuzz_envelope,
    "event": fuzz_event,
    "receipt": fuzz_receipt,
    "battery_code": fuzz_battery_code,
    "topic": fuzz_topic,
    "intake": fuzz_intake,
    "mqtt": fuzz_mqtt,
    "jbd": fuzz_jbd,
    "daly": fuzz_daly,
    "scanner": fuzz_scanner,
    "station": fuzz_station,
    "gbt27930": fuzz_gbt27930,
    "dbc": fuzz_dbc,
    "agent_config": _config(agent_config.load),
    "server_config": _config(server_config.load),
}


def seeds() -> dict[str, dict[str, bytes]]:
    """Valid inputs of every target (from the protocol's encoders, the firmware stubs and configs/),
    and hand-made hostile ones: what the fuzzers start from and what CI replays."""
    from battery_trace.firmware_stubs import daly_bms, gbt27930_bms, jbd_bms

    from tests.event_examples import FIELDS, event

    configs = Path(__file__).resolve().parent.parent / "configs"
    ev = event("swapped")
    sealed = envelope.sign(events.encode(ev), DEVICE_KEY)
    receipt = receipts.sign(
        receipts.Receipt("station-1", DEVICE_KEY.public.kid, 7, bytes(range(32)), int(NOW * 1000)), SERVER_KEY
    )
    nested = b"\x81" * 5000 + b"\x00"  # deeper than any decoder allows
    huge_length = b"\x5b" + b"\xff" * 8  # a byte string claiming 2**64 - 1 bytes
    session = gbt27930_bms.charging_session(gbt27930_bms.Pack(), rounds=2)
    can = b"".join(f.arbitration_id.to_bytes(4, "big") + bytes([len(f.data)]) + f.data for f in session)
    pack = jbd_bms.PackState()
    return {
        "cbor": {
            "event": events.encode(ev),
            "nested": nested,
            "huge-length": huge_length,
            "indefinite": b"\x5f\x41a\xff",
            "duplicate-keys": b"\xa2\x01\x01\x01\x02",
        },
        "envelope": {
            "swapped": sealed,
            "untagged": sealed[1:],
            "nested": b"\xd2" + nested,
            "truncated": sealed[: len(sealed) // 2],
        },
        "event": {t: events.encode(event(t)) for t in FIELDS} | {"nested": nested},
        "receipt": {"receipt": receipt, "event-as-receipt": sealed},
        "battery_code": {
            "valid": b"0RJPEA00HAU0AAG1C3000123",
            "lower": b" 0rjpea00hau0aag1c3000123 ",
            "second-life": b"0RJPEA00HAU0AAG1C3000123R1",
            "nul": b"0RJPEA\x0000HAU0AAG1C3000123",
        },
        "topic": {"events": b"bt/v1/station-1/events", "wildcard": b"bt/v1/+/events", "deep": b"bt/v1/a/b/c"},
        "intake": {"swapped": sealed, "receipt": receipt, "nested": b"\xd2" + nested},
        "mqtt": {
            "session": b"\x20\x09\x01\x00\x06\x21\x00\x14\x13\x00\x3c"  # CONNACK: receive max 20, keep-alive 60
            + b"\x90\x04\x00\x01\x00\x01"  # SUBACK: granted QoS 1
            + b"\x3a\x0e\x00\x03t/e\x00\x07\x02\x01\x01cbor"  # PUBLISH, QoS 1, DUP, a property
            + b"\x40\x04\x00\x02\x87\x00"  # PUBACK: not authorized
            + b"\xd0\x00"  # PINGRESP
            + b"\xe0\x09\x8e\x07\x1f\x00\x04gone",  # DISCONNECT: session taken over, with a reason
            "long-length": b"\x30\xff\xff\xff\xff\x01",
            "over-limit": b"\x30\xff\xff\x7f",
        },
        "jbd": {
            "basic": jbd_bms.response(jbd.BASIC, jbd_bms.basic_payload(pack)),
            "cells": jbd_bms.response(jbd.CELLS, jbd_bms.cells_payload(pack)),
            "bad-checksum": jbd_bms.response(jbd.BASIC, b"\x00" * 23)[:-3] + b"\x00\x00\x77",
        },
        "daly": {
            "soc": b"".join(daly_bms.answers(0x90, daly_bms.DalyPack())),
            "cells": b"".join(daly_bms.answers(0x95, daly_bms.DalyPack())),
        },
        "scanner": {"codes": b"0RJPEA00HAU0AAG1C3000123\r\n\xff\xfe garbage\r\n" + b"A" * 5000 + b"\n"},
        "station": {
            "swap": b"VEHICLE LNBSCB3F1PW123456\nOUT 3\nIN 5\nDONE\n",
            "rig": b"CONFIRM rebalance cell 12 low\nREPLACE 0RJPEA00HAU0AAG1C3000131 LNBSCB3F1PW123456\n",
        },
        "gbt27930": {"session": can},
        "dbc": {"pack": b"".join(bytes([min(n, 2), len(d)]) + d for n, d in enumerate(_dbc_frames()))},
        "agent_config": {p.name: p.read_bytes() for p in sorted(configs.glob("agent-*.toml"))},
        "server_config": {"server.toml": (configs / "server.toml").read_bytes()},
    }


def _dbc_frames() -> list[bytes]:
    """The stub's frames, in the order of _dbc_decoder's identifiers."""
    from battery_trace.firmware_stubs import dbc_pack

    pack = dbc_pack.VendorPack()
    return [dbc_pack.status(pack)[1], dbc_pack.cells(pack)[1], *(d for _, d in dbc_pack.identity(pack))]


def save_crasher(name: str, data: bytes) -> Path:
    path = CORPUS / name / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _hypothesis(name: str, seconds: float) -> int:
    """Random bytes and mutations of the corpus for ``seconds``; returns the number of crashers saved."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    seeds = [p.read_bytes() for p in sorted((CORPUS / name).glob("*"))] or [b""]
    target = TARGETS[name]
    found = 0
    deadline = time.monotonic() + seconds

    def mutate(seed: bytes, edits: list[tuple[int, int]]) -> bytes:
        out = bytearray(seed)
        for pos, byte in edits:
            if out:
                out[pos % len(out)] = byte
            else:
                out.append(byte)
        return bytes(out)

    inputs = st.one_of(
        st.binary(max_size=512),
        st.builds(mutate, st.sampled_from(seeds), st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)))),
        st.builds(lambda s, n: s[:n], st.sampled_from(seeds), st.integers(0, 4096)),
    )

    # Generation only: the deadline stops the run by raising, and a shrink or replay of that "failure"
    # would report a flaky test instead of ending quietly.
    @settings(
        max_examples=10**9,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(inputs)
    def run(data: bytes) -> None:
        nonlocal found
        if time.monotonic() > deadline:
            raise TimeoutError
        try:
            target(data)
        except Exception as exc:  # any escape from a target is a finding
            found += 1
            print(f"{name}: {type(exc).__name__}: {exc} -> {save_crasher(name, data)}", flush=True)

    with contextlib.suppress(TimeoutError):
        run()
    return found


def _atheris(name: str, seconds: float) -> None:
    import atheris  # optional

    atheris.instrument_all()  # coverage feedback from every loaded module's bytecode
    target = TARGETS[name]

    def one(data: bytes) -> None:
        try:
            target(data)
        except Exception:
            print(f"{name}: crasher saved to {save_crasher(name, data)}", flush=True)
            raise

    with tempfile.TemporaryDirectory() as work:
        # libFuzzer grows its own corpus in a scratch folder, seeded from ours; only crashers come back.
        atheris.Setup(
            [
                sys.argv[0],
                f"-max_total_time={int(seconds)}",
                "-print_final_stats=1",
                f"-artifact_prefix={work}/",  # we save crashers ourselves, under a name CI replays
                work,
                str(CORPUS / name),
            ],
            one,
        )
        atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: all of {', '.join(TARGETS)}")
    p.add_argument("--seconds", type=float, default=30.0, help="per target (default 30)")
    p.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    p.add_argument("--write-seeds", action="store_true", help="(re)write the seed files of tests/corpus and stop")
    args = p.parse_args(argv)
    if args.write_seeds:
        for name, files in seeds().items():
            (CORPUS / name).mkdir(parents=True, exist_ok=True)
            for file, data in files.items():
                (CORPUS / name / f"seed-{file}").write_bytes(data)
        return 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        p.error(f"unknown target {', '.join(unknown)}; valid: {', '.join(TARGETS)}")
    if engine == "atheris":
        if len(names) != 1:
            p.error("atheris runs one target per process: name one (or use --engine hypothesis)")
        _atheris(names[0], args.seconds)
        return 0
    found = 0
    for name in names:
        print(f"fuzzing {name} for {args.seconds:.0f} s (hypothesis)...", flush=True)
        found += _hypothesis(name, args.seconds)
    print(f"{found} crashers saved" if found else "no crashers")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
