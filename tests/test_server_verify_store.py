"""Server verification (each reason, in DESIGN.md §5.2 order) and the SQLite record's write semantics."""

import time

import pytest
from battery_trace.protocol import cbor, envelope, events, keys
from battery_trace.server import verify
from battery_trace.server.records import Accepted, KeyRecord, Rejected
from battery_trace.server.store import Store, StoreError
from battery_trace.server.store.schema import MIGRATIONS
from battery_trace.server.verify import REASONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.event_examples import PACK, event

DEVICE_KEY = keys.generate()
NOW = time.time()
TOPIC = "bt/v1/station-1/events"


def record(role="swap_operator", device="station-1", key=DEVICE_KEY, **kw) -> KeyRecord:
    fields = {"state": "active", "valid_from": NOW - 100, "valid_until": None, "revoked_at": None, **kw}
    return KeyRecord(key.public.kid, device, role, key.public, **fields)


def check(raw: bytes, rec: KeyRecord | None = None, topic: str = TOPIC, max_size: int = 65536):
    rec = rec or record()
    parsed = verify.parse(topic, raw, max_size)
    if not isinstance(parsed, verify.Parsed):
        return parsed
    return verify.check(parsed, rec if parsed.kid == rec.kid else None, NOW)


def sealed(ev: events.Event, key=DEVICE_KEY) -> bytes:
    return envelope.sign(events.encode(ev), key)


def test_a_good_event_is_accepted_with_its_code_problems_noted():
    outcome = check(sealed(event("swapped", code_in="0RJXEA00HAU0AAG1C3000124")))
    assert isinstance(outcome, Accepted)
    assert [p.path for p in outcome.code_problems] == ["code_in"]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: check(sealed(event()), max_size=100), "too_large"),
        (lambda: check(sealed(event()), topic="bt/v1/station-1/status"), "bad_topic"),
        (lambda: check(b"not cose at all"), "malformed"),
        (lambda: check(sealed(event(), keys.generate())), "unknown_key"),
        (lambda: check(sealed(event()), record(revoked_at=NOW - 1)), "key_revoked"),
        (lambda: check(sealed(event()), record(valid_from=NOW + 60)), "key_not_active"),
        (lambda: check(sealed(event())[:-3] + b"\x00\x00\x00"), "bad_signature"),
        (lambda: check(sealed(event()), topic="bt/v1/station-2/events"), "device_mismatch"),
        (lambda: check(sealed(event()), record(device="station-2")), "device_mismatch"),
        (lambda: check(sealed(event("produced"))), "role_not_allowed"),
        (lambda: check(envelope.sign(b"\xa1\x66device\x69station-1", DEVICE_KEY)), "schema"),
    ],
)
def test_each_failure_has_its_named_reason(make, reason):
    outcome = make()
    assert isinstance(outcome, Rejected) and outcome.reason == reason, outcome
    assert reason in REASONS and outcome.detail


def test_forged_signature_by_a_key_claiming_anothers_kid_is_refused():
    forger = keys.generate()
    payload = events.encode(event())
    protected = bytes.fromhex("a2012704") + b"\x50" + DEVICE_KEY.public.kid  # {1: -8, 4: victim's kid}
    sig_structure = cbor.encode(["Signature1", protected, b"", payload])
    forged = cbor.encode(cbor.Tag(18, [protected, {}, payload, forger.sign(sig_structure)]))
    outcome = check(forged)
    assert isinstance(outcome, Rejected) and outcome.reason == "bad_signature"


@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_rejected_never_raised(raw):
    assert isinstance(check(raw), Rejected)


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    s.enroll("station-1", "swap_operator", DEVICE_KEY.public, "Org", NOW - 100)
    yield s
    s.close()


def chain(n: int) -> list[Accepted]:
    out, prev = [], events.ZERO_HASH
    for seq in range(1, n + 1):
        raw = sealed(event(seq=seq, prev=prev))
        outcome = check(raw)
        assert isinstance(outcome, Accepted)
        out.append(outcome)
        prev = outcome.envelope.hash
    return out


def test_writes_are_idempotent_and_the_watermark_waits_for_gaps(store):
    a = chain(5)
    first = store.commit([a[0], a[1], a[3]], [], NOW)
    assert (first.stored, first.watermarks[DEVICE_KEY.public.kid][:2]) == (3, ("station-1", 2))
    again = store.commit([a[0], a[3], a[4]], [], NOW)
    assert (again.stored, again.duplicates) == (1, 2)
    assert again.watermarks[DEVICE_KEY.public.kid][1] == 2  # seq 3 is still missing
    filled = store.commit([a[2]], [], NOW)
    assert filled.watermarks[DEVICE_KEY.public.kid][1] == 5
    assert store.chain(DEVICE_KEY.public.kid) == [(x.event.seq, x.envelope.raw) for x in a]


def test_rejects_go_to_quarantine_with_reason_and_raw_bytes(store):
    bad = check(b"\xd2garbage")
    store.commit([], [bad], NOW)
    assert store.counts() == {"events": 0, "rejected": {"malformed": 1}, "findings_open": {}, "quarantine_dropped": {}}


def test_enrolment_refuses_a_second_enrolment_and_a_reused_key(store):
    with pytest.raises(StoreError, match="already enrolled"):
        store.enroll("station-1", "swap_operator", keys.generate().public, None, NOW)
    with pytest.raises(StoreError, match="already enrolled"):
        store.enroll("station-9", "gateway", DEVICE_KEY.public, None, NOW)
    assert [d["device"] for d in store.devices()] == ["station-1"]


def test_migrations_are_versioned_and_rerunnable(store):
    store.db.migrate()
    reopened = Store(store.url)
    assert reopened.db.version() == len(MIGRATIONS)
    assert reopened.key(DEVICE_KEY.public.kid).device == "station-1"
    reopened.close()


def test_a_batch_larger_than_one_statement_is_looked_up_and_stored_whole(store_url):
    """More keys, chains and batteries in one batch than one lookup statement takes (500): all found,
    all stored, every watermark moved, a duplicate still recognised in the second chunk."""
    s = Store(store_url)
    devices = [(f"station-{i:03d}", keys.generate()) for i in range(620)]
    for name, key in devices:
        s.enroll(name, "swap_operator", key.public, None, NOW - 100)
    found = s.keys(key.public.kid for _, key in devices)
    assert {r.device for r in found.values()} == {name for name, _ in devices}
    batch = []
    for i, (name, key) in enumerate(devices):
        ev = events.Event(
            name,
            1,
            events.ZERO_HASH,
            1_767_225_600_000 + i,
            "health",
            "label",
            {"code": f"0RJPEA00HAU0AAG1C{3000000 + i:07d}", "health": {"soc_pct": 50}, "slot": 1},
        )
        p = verify.parse(f"bt/v1/{name}/events", envelope.sign(events.encode(ev), key), 65536)
        outcome = verify.check(p, found[key.public.kid], NOW)
        assert isinstance(outcome, Accepted), outcome
        batch.append(outcome)
    first = s.commit(batch, [], NOW)
    assert (first.stored, first.duplicates) == (620, 0)
    assert {mark.seq for mark in first.watermarks.values()} == {1}
    again = s.commit(batch[-3:], [], NOW)
    assert (again.stored, again.duplicates) == (0, 3)
    assert s.counts()["events"] == 620
    s.close()


@given(st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_delivery_order_stores_each_event_once_and_the_watermark_follows_the_gaps(store_url, data):
    """Batches in any order, with repeats and holes: each event stored once, duplicates counted, the
    watermark always at the end of the contiguous prefix delivered so far, the chain intact."""
    s = Store(store_url)
    key = keys.generate()
    device = f"station-{key.public.kid.hex()[:8]}"  # a device of its own for every example
    s.enroll(device, "swap_operator", key.public, None, NOW - 100)
    record = s.key(key.public.kid)
    n = data.draw(st.integers(1, 12))
    chain, prev = [], events.ZERO_HASH
    for seq in range(1, n + 1):
        fields = {"code": PACK, "health": {"soc_pct": 50}}
        ev = events.Event(device, seq, prev, 1_767_225_600_000 + seq, "health", "label", fields)
        outcome = verify.check(verify.parse(f"bt/v1/{device}/events", sealed(ev, key), 65536), record, NOW)
        assert isinstance(outcome, Accepted), outcome
        chain.append(outcome)
        prev = outcome.envelope.hash
    batches = data.draw(st.lists(st.lists(st.integers(0, n - 1), min_size=1, max_size=6), max_size=6))
    delivered: set[int] = set()
    for batch in [*batches, list(range(n))]:
        result = s.commit([chain[i] for i in batch], [], NOW)
        new = {i for i in batch} - delivered
        assert (result.stored, result.duplicates) == (len(new), len(batch) - len(new))
        delivered |= new
        prefix = next((i for i in range(n) if i not in delivered), n)
        assert result.watermarks[key.public.kid][:2] == (device, prefix)
    assert s.chain(key.public.kid) == [(x.event.seq, x.envelope.raw) for x in chain]
    assert not [f for f in s.findings(open_only=True) if f["subject"] == f"device:{device}"]
    s.close()
