"""A hostile device: it signs whatever it likes with its own, validly enrolled key.

The promise (DESIGN.md §7.4): no single message, however validly signed, stops a batch, a collector or
ingestion. Every message ends up stored or in quarantine with a named reason, on both backends, and
every honest device's events are stored beside it. The class of trouble is text or numbers one
backend takes and the other refuses (PostgreSQL refuses NUL in text, for one): the contract refuses
control characters in every text, and the store isolates any message the database still refuses.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from battery_trace.protocol import cbor, envelope, keys
from battery_trace.server.records import Accepted, Rejected
from battery_trace.server.store import Store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import collectors, waiting
from harness.publisher import Publisher
from tests.world import DAY, T0, Device, World

pytestmark = pytest.mark.hostile
PACK = "0RJPEA00HAU0AAG1C3000123"
VIN = "LNBSCB3F1PW123456"


def signed(device: Device, m: dict[str, Any]) -> bytes:
    """What a hostile device sends: its map, signed, in the deterministic form when CBOR has one for it
    and otherwise in whatever form cbor2 gives (NaN, bignums): the server must cope with both."""
    try:
        payload = cbor.encode(m)
    except (ValueError, TypeError):
        payload = cbor2.dumps(m, canonical=True)
    return envelope.sign(payload, device.key)


def base(device: Device, seq: int, event_type: str) -> dict[str, Any]:
    common = {"v": 1, "device": device.name, "seq": seq, "prev": bytes(32), "time": T0 + seq, "source": "label"}
    body = {
        "health": {"code": PACK, "health": {"soc_pct": 50, "voltage_v": 350.0, "faults": ["ok"]}, "vin": VIN},
        "maintenance": {"code": PACK, "action": "repair", "findings": "cell 12 low"},
        "handed_over": {"code": PACK, "from_entity": "A Co", "to_entity": "B Co", "to_role": "recycler"},
    }[event_type]
    return {**common, "type": event_type, **body}


TEXT = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["\x00", "A\x00B", f"{PACK[:10]}\x00{PACK[11:]}", "\u202e\u200f", "\t", "\n", "\x85", "\x9b"]),
    st.sampled_from(["é" * 300, "码" * 5000, "A" * 257, "\x00" * 1000]),
)
NUMBER = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**64), 2**70]),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 5e-324, 1.7976931348623157e308, float("nan"), float("inf"), float("-inf")]),
)
VALUE = st.one_of(TEXT, NUMBER, st.lists(st.one_of(TEXT, NUMBER), max_size=3), st.none(), st.booleans())


def _set(m: dict[str, Any], path: str, value: Any) -> None:
    *outer, last = path.split(".")
    target = m
    for part in outer:
        target = target[part]
    target[last] = value


@st.composite
def hostile_maps(draw: st.DrawFn, device: Device, seq: int) -> dict[str, Any]:
    event_type = draw(st.sampled_from(["health", "maintenance", "handed_over"]))
    m = base(device, seq, event_type)
    places = {
        "health": ["code", "vin", "slot", "health.voltage_v", "health.soc_pct", "health.cycles", "health.faults"],
        "maintenance": ["code", "findings", "vin"],
        "handed_over": ["from_entity", "to_entity", "code"],
    }[event_type] + ["time", "source"]
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from([*places, "unknown field name", "unknown health field name"]))
        if where == "unknown field name":
            m[draw(TEXT)] = draw(VALUE)
        elif where == "unknown health field name" and event_type == "health":
            m["health"][draw(TEXT)] = 1
        elif where in {"health.faults"}:
            _set(m, where, draw(st.lists(TEXT, min_size=1, max_size=3)))
        elif where in {"code", "vin", "findings", "from_entity", "to_entity", "source"}:
            _set(m, where, draw(st.one_of(TEXT, TEXT.map(str.upper))))
        else:
            _set(m, where, draw(NUMBER))
    return m


def _stored_and_quarantined(store: Store) -> tuple[set[bytes], set[bytes]]:
    with store.db.reading() as tx:
        stored = {bytes(r[0]) for r in tx.all("SELECT envelope FROM events")}
        quarantined = {bytes(r[0]) for r in tx.all("SELECT raw FROM quarantine")}
    return stored, quarantined


def _commit_as_the_intake_does(world: World, batch: list[tuple[Device, bytes]], at_ms: int) -> None:
    outcomes = [world.check(device, raw, at_ms) for device, raw in batch]
    accepted = [o for o in outcomes if isinstance(o, Accepted)]
    rejected = [o for o in outcomes if isinstance(o, Rejected)]
    world.store.commit(accepted, rejected, at_ms / 1000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_whatever_a_device_signs_is_stored_or_quarantined_and_the_batch_goes_on(store_url: str, data) -> None:
    store = Store(store_url)
    try:
        world = World(store)
        number = len(store.devices())
        hostile = world.device(f"hostile-{number}", "maintenance")
        honest = world.device(f"honest-{number}", "gateway")
        batch = [(honest, honest.seal("health", {"code": PACK, "health": {"soc_pct": 60}}, T0 + 1))]
        for seq in range(1, data.draw(st.integers(1, 4)) + 1):
            batch.append((hostile, signed(hostile, data.draw(hostile_maps(hostile, seq)))))
        batch.append((honest, honest.seal("health", {"code": PACK, "health": {"soc_pct": 61}}, T0 + 2)))
        _commit_as_the_intake_does(world, batch, T0 + DAY)

        stored, quarantined = _stored_and_quarantined(store)
        assert set(honest.sent) <= stored
        for _, raw in batch:
            assert raw in stored or raw in quarantined
        # and the record still takes honest events afterwards
        later = honest.seal("health", {"code": PACK, "health": {"soc_pct": 62}}, T0 + 3)
        world.deliver(honest, later, T0 + DAY)
        assert later in _stored_and_quarantined(store)[0]
    finally:
        store.close()


REFUSED_CODE = "0RJPEA00HAU0AAG1C3999999"


def refuse_code_in_the_database(store: Store, code: str) -> None:
    """Make the real database refuse one value, as a backend refuses what it cannot hold: the store must
    isolate it whatever the reason, so the test does not depend on finding a gap in the contract."""
    with store.db.transaction() as tx:
        if store.db.dialect.name == "sqlite":
            tx.execute(
                f"CREATE TRIGGER refuse_code BEFORE INSERT ON event_codes WHEN NEW.code = '{code}' "
                "BEGIN SELECT RAISE(ABORT, 'this backend cannot hold it'); END"
            )
        else:
            tx.execute(
                "CREATE FUNCTION refuse_code() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.code = '{code}' THEN RAISE EXCEPTION 'this backend cannot hold it' USING ERRCODE = '22000'; "
                "END IF; "
                "RETURN NEW; END $$"
            )
            tx.execute(
                "CREATE TRIGGER refuse_code BEFORE INSERT ON event_codes FOR EACH ROW EXECUTE FUNCTION refuse_code()"
            )


def test_an_event_the_database_refuses_is_quarantined_alone(store_url: str) -> None:
    store = Store(store_url)
    try:
        refuse_code_in_the_database(store, REFUSED_CODE)
        world = World(store)
        devices = [world.device(f"gw-{i}", "gateway") for i in range(5)]
        batch = []
        for i in range(40):
            device = devices[i % 5]
            code = REFUSED_CODE if i == 17 else PACK
            batch.append((device, device.seal("health", {"code": code, "health": {"soc_pct": i}}, T0 + i)))
        outcomes = [world.check(device, raw, T0 + DAY) for device, raw in batch]
        result = store.commit([o for o in outcomes if isinstance(o, Accepted)], [], (T0 + DAY) / 1000)

        stored, quarantined = _stored_and_quarantined(store)
        refused = batch[17][1]
        assert result.stored == 39 and stored == {raw for _, raw in batch} - {refused}
        assert quarantined == {refused}
        assert [r.reason for r in result.refused] == ["store_refused"]
        assert "this backend cannot hold it" in store.rejects()[0]["detail"]
        # the refused event's device is receipted up to the event before it, never past it
        device = batch[17][0]
        assert result.watermarks[device.key.public.kid][:2] == (device.name, 3)
    finally:
        store.close()


NASTY = [
    {"code": f"{PACK[:10]}\x00{PACK[11:]}"},  # stopped every PostgreSQL collector
    {"code": "\x00"},
    {"vin": "LNBSCB3F1PW12345\x00"},
    {"health": {"soc_pct": 50, "faults": ["ov\x00"]}},
    {"health": {"soc_pct": 50, "\x00": 1}},
    {"code": PACK, "\x00name": 1},  # an unknown field whose *name* holds a NUL: the quarantine insert failed
    {"code": PACK, "\u202eevil": "\u202e"},
    {"code": "码" * 60},
    {"health": {"soc_pct": 1e308, "voltage_v": -0.0}},
    {"slot": 2**63},
]


@pytest.mark.integration
def test_a_hostile_device_stops_no_collector_and_no_honest_device(tmp_path: Path, broker, store_url: str) -> None:
    """Real collector process, real mosquitto, both backends: the nasty events are each stored or
    quarantined, every honest event is stored, and the collector is still running afterwards."""
    store = Store(store_url)
    world = World(store)
    honest = [world.device(f"gw-{i}", "gateway") for i in range(3)]
    hostile = world.device("hostile-1", "gateway")
    refuse_code_in_the_database(store, REFUSED_CODE)  # and one event the database itself refuses
    key_path = tmp_path / "server.key"
    keys.save_private(keys.generate(), key_path)
    config = collectors.write_config(tmp_path / "c1.toml", store_url, broker, "c1", key_path)
    log = tmp_path / "c1.log"
    proc = collectors.start(config, log)
    publisher = None
    try:
        collectors.wait_subscribed(log)
        publisher = Publisher(broker, "fleet")
        nasty = []
        for seq, change in enumerate(NASTY, start=1):
            m = base(hostile, seq, "health")
            m["health"] = dict(m["health"])
            m.update(change)
            nasty.append(signed(hostile, m))
        refused = honest[0].seal("health", {"code": REFUSED_CODE, "health": {"soc_pct": 1}}, T0)
        honest[0].sent.remove(refused)
        messages = [(f"bt/v1/{honest[0].name}/events", refused)]
        for i in range(20):
            for device in honest:
                raw = device.seal("health", {"code": PACK, "health": {"soc_pct": i}}, T0 + i * 1000)
                messages.append((f"bt/v1/{device.name}/events", raw))
            if i < len(nasty):
                messages.append(("bt/v1/hostile-1/events", nasty[i]))
        publisher.publish(messages)

        def settled() -> bool:
            stored, quarantined = _stored_and_quarantined(store)
            return all(raw in stored for d in honest for raw in d.sent) and all(
                raw in stored or raw in quarantined for raw in [*nasty, refused]
            )

        waiting.wait_until(settled, 60, "every honest event stored, every nasty one stored or quarantined", [proc])
        time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]
        assert {r["reason"] for r in store.rejects(limit=1000) if r["raw"] == refused.hex()} == {"store_refused"}
    finally:
        if publisher:
            publisher.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        store.close()


# -- an unsigned change to the outer envelope is not a new event --------------------------------------


def _head(major: int, n: int, width: int) -> bytes:
    """A CBOR head of ``width`` argument bytes (0 = in the initial byte), shortest or not."""
    info = {0: n, 1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | info]) + (n.to_bytes(width, "big") if width else b"")


def re_encodings(raw: bytes) -> dict[str, bytes]:
    """Every unsigned re-encoding of a genuine envelope we can construct: the signature stays valid."""
    env = envelope.decode(raw)
    parts = (env.protected_raw, env.payload, env.signature)

    def build(
        tag: bytes = b"\xd2", array: bytes = b"\x84", unprotected: bytes = b"\xa0", widths=(None,) * 3, end=b""
    ) -> bytes:
        out = [tag, array]
        for i, part in enumerate(parts):
            if i == 1:
                out.append(unprotected)
            width = widths[i]
            out.append(cbor.byte_string_head(len(part)) if width is None else _head(2, len(part), width))
            out.append(part)
        return b"".join(out) + end

    kid_map = cbor.encode({4: env.kid})
    variants = {
        "unprotected content type": build(unprotected=cbor.encode({3: "application/cbor"})),
        "unprotected private label": build(unprotected=cbor.encode({-70000: b"x"})),
        "unprotected kid again": build(unprotected=kid_map),
        "unprotected map, long head": build(unprotected=b"\xb8\x00"),
        "unprotected map, indefinite": build(unprotected=b"\xbf\xff"),
        "array, long head": build(array=b"\x98\x04"),
        "array, indefinite": build(array=b"\x9f", end=b"\xff"),
        "tag, long head": build(tag=b"\xd8\x12"),
        "tag, two-byte head": build(tag=b"\xd9\x00\x12"),
        "self-described (tag 55799)": b"\xd9\xd9\xf7" + raw,
        "shareable (tag 28)": b"\xd8\x1c" + raw,
        "signature, long head": build(widths=(None, None, 2)),
        "payload, long head": build(widths=(None, 4, None)),
        "protected, eight-byte head": build(widths=(8, None, None)),
        "signature in chunks": build().replace(
            cbor.byte_string_head(64) + env.signature, b"\x5f" + cbor.encode(env.signature[:32])
            + cbor.encode(env.signature[32:]) + b"\xff"
        ),
    }  # fmt: skip
    assert build() == raw  # the builder itself is faithful
    return variants


def test_every_unsigned_re_encoding_of_an_envelope_is_refused() -> None:
    device = Device("gw-1", "gateway", keys.generate())
    raw = device.seal("health", {"code": PACK, "health": {"soc_pct": 1}}, T0)
    for name, variant in re_encodings(raw).items():
        assert variant != raw
        with pytest.raises(envelope.EnvelopeError) as refused:
            envelope.decode(variant)
        assert refused.value.reason == "malformed", name


@pytest.mark.parametrize("copy_first", [False, True], ids=["genuine-first", "copy-first"])
def test_a_re_encoded_copy_neither_displaces_the_genuine_event_nor_accuses_its_device(
    store_url: str, copy_first: bool
) -> None:
    store = Store(store_url)
    try:
        world = World(store)
        device = world.device("gw-1", "gateway")
        first = device.seal("health", {"code": PACK, "health": {"soc_pct": 1}}, T0)
        second = device.seal("health", {"code": PACK, "health": {"soc_pct": 2}}, T0 + 1000)
        copies = list(re_encodings(first).values())
        order = [*copies, first, second] if copy_first else [first, *copies, second]
        for raw in order:
            world.deliver(device, raw, T0 + DAY)
        stored, quarantined = _stored_and_quarantined(store)
        assert stored == {first, second}
        assert quarantined == set(copies)
        assert {r["reason"] for r in store.rejects(limit=100)} == {"malformed"}
        assert world.open_findings() == []  # no fork, no chain break against an honest device
        assert store.device("gw-1")["keys"][0]["watermark"] == 2
    finally:
        store.close()


# -- a device clock far ahead ----------------------------------------------------------------------------


def test_a_future_dated_event_is_a_finding_and_does_not_pin_the_battery(store_url: str) -> None:
    """An event dated 2099 by a wrong (or lying) clock used to sort after everything real, so the
    battery stayed where it said for good. The record orders an event no later than its arrival, and
    the clock is a finding against the device."""
    store = Store(store_url)
    try:
        world = World(store)
        maker = world.device("maker-1", "vehicle_maker")
        skewed = world.device("maker-2", "vehicle_maker")
        station = world.device("station-1", "swap_operator")
        other = "0RJPEA00HAU0AAG1C3000124"
        world.send(maker, "installed", {"code": PACK, "vin": VIN}, T0)
        year_2099 = 4_070_908_800_000
        vin2 = "LNBSCB3F3PW654321"
        world.deliver(skewed, skewed.seal("installed", {"code": PACK, "vin": vin2}, year_2099), T0 + DAY)
        swap = {"vin": vin2, "code_out": PACK, "code_in": other, "slot_out": 1, "slot_in": 2}
        swap |= {"health_out": {"soc_pct": 20}, "health_in": {"soc_pct": 95}}
        world.send(station, "swapped", swap, T0 + 2 * DAY, delay_ms=1000)
        trace = store.trace(PACK)
        assert trace["state"] == "in_stock"  # the swap took it out of the vehicle; 2099 no longer wins
        assert ("clock_ahead", "device:maker-2") in world.open_findings()
        (finding,) = store.findings(kind="clock_ahead")
        assert "2099" in finding["detail"]
    finally:
        store.close()


def test_an_envelope_stored_before_the_canonical_rule_stays_readable(store_url: str) -> None:
    """A record keeps what it accepted under the rules of its day: a stored envelope with an unprotected
    header (refused at intake today) still reads for replays, traces, exports and the audit."""
    from battery_trace.server.audit import audit_chain

    store = Store(store_url)
    try:
        world = World(store)
        maker = world.device("maker-1", "vehicle_maker")
        raw = maker.seal("installed", {"code": PACK, "vin": VIN}, T0)
        world.deliver(maker, raw, T0 + 1000)
        old_form = re_encodings(raw)["unprotected content type"]
        with store.db.transaction() as tx:  # as a store before the rule held it
            tx.execute("UPDATE events SET envelope = ?, facts = NULL", (old_form,))
            tx.execute("UPDATE batteries SET applied_ms = NULL")
        station = world.device("station-1", "swap_operator")
        swap = {"vin": VIN, "code_out": PACK, "code_in": "0RJPEA00HAU0AAG1C3000124", "slot_out": 1, "slot_in": 2}
        result = world.send(
            station, "swapped", swap | {"health_out": {"soc_pct": 1}, "health_in": {"soc_pct": 2}}, T0 + DAY
        )
        assert result.stored == 1 and not result.refused  # the replay read the old envelope
        assert store.trace(PACK)["state"] == "in_stock"
        key = store.device_keys("maker-1")[0]
        assert audit_chain(key, store.chain(key.kid)).first_break is None
    finally:
        store.close()
