"""Sealer and outbox: one transaction per event, a chain that survives pruning and restarts."""

import pytest
from battery_trace.agent.outbox import Outbox
from battery_trace.agent.sealer import Draft, Refused, Sealer
from battery_trace.protocol import envelope, events, keys

from tests.event_examples import FIELDS, T0


def draft(**overrides) -> Draft:
    return Draft("health", "label", {**FIELDS["health"], **overrides}, T0)


@pytest.fixture
def sealer(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    yield Sealer(outbox, keys.generate(), "station-1")
    outbox.close()


def test_sealed_events_are_numbered_and_hash_linked(sealer):
    assert [sealer.seal(draft()) for _ in range(3)] == [1, 2, 3]
    prev = events.ZERO_HASH
    for item in sealer.outbox.pending():
        env = envelope.verify(item.envelope, sealer.key.public)
        ev = events.decode(env.payload)
        assert (ev.seq, ev.prev, ev.device) == (item.seq, prev, "station-1")
        prev = env.hash


def test_an_invalid_code_is_never_sealed_and_uses_no_sequence_number(sealer):
    with pytest.raises(Refused) as err:
        sealer.seal(draft(code="0RJXEA00HAU0AAG1C3000123"))
    assert err.value.reason == "invalid_code" and "position 4" in str(err.value)
    with pytest.raises(Refused, match="required"):
        sealer.seal(Draft("health", "label", {"code": FIELDS["health"]["code"]}, T0))
    assert sealer.refused == {"invalid_code": 1, "schema": 1}
    assert sealer.outbox.depth()[0] == 0
    assert sealer.seal(draft()) == 1


def test_pruning_keeps_the_chain_head_and_a_reopened_outbox_continues(tmp_path):
    key = keys.generate()
    path = tmp_path / "outbox.sqlite"
    first = Sealer(Outbox(path), key, "station-1")
    for _ in range(4):
        first.seal(draft())
    last_hash = envelope.envelope_hash(first.outbox.pending()[-1].envelope)
    assert first.outbox.prune(key.public.kid, 4, last_hash) == 4
    assert first.outbox.depth() == (0, None)
    first.outbox.close()

    again = Sealer(Outbox(path), key, "station-1")
    assert again.seal(draft()) == 5
    (item,) = again.outbox.pending()
    assert events.decode(envelope.decode(item.envelope).payload).prev == last_hash
    again.outbox.close()


def test_a_receipt_prunes_only_the_chain_it_names(tmp_path):
    """A receipt whose hash at the watermark is not this outbox's event there, or whose watermark lies
    beyond this outbox's head, speaks of another chain under the same key: nothing is deleted."""
    key = keys.generate()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sealer = Sealer(outbox, key, "station-1")
    for _ in range(4):
        sealer.seal(draft())
    own = {p.seq: envelope.envelope_hash(p.envelope) for p in outbox.pending()}
    kid = key.public.kid
    assert outbox.prune(kid, 3, own[2]) is None  # the hash of another event
    assert outbox.prune(kid, 9, own[4]) is None  # beyond this outbox's head
    assert outbox.depth()[0] == 4
    assert outbox.prune(kid, 2, own[2]) == 2
    assert outbox.prune(kid, 1, b"any") == 0  # already left: nothing of it to compare or delete
    assert [p.seq for p in outbox.pending()] == [3, 4]
    outbox.close()


def test_a_failing_build_leaves_no_trace(sealer):
    def broken(seq, prev):
        raise RuntimeError("power cut in the middle")

    with pytest.raises(RuntimeError):
        sealer.outbox.append(sealer.kid, broken)
    assert sealer.outbox.head(sealer.kid) == 0 and sealer.outbox.depth()[0] == 0


def test_only_a_receipt_signed_by_the_server_key_prunes(tmp_path):
    from battery_trace.agent.uplink import MqttSettings, Uplink
    from battery_trace.protocol import receipts
    from battery_trace.protocol.envelope import envelope_hash

    server, device = keys.generate(), keys.generate()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sealer = Sealer(outbox, device, "station-1")
    for _ in range(3):
        sealer.seal(draft())
    uplink = Uplink(MqttSettings(), outbox, "station-1", device.public.kid, server.public)
    second = next(p for p in outbox.pending() if p.seq == 2)
    receipt = receipts.Receipt("station-1", device.public.kid, 2, envelope_hash(second.envelope), T0)
    assert uplink.handle_receipt(receipts.sign(receipt, keys.generate())) == 0  # forged
    assert uplink.handle_receipt(b"\xd2\x84garbage") == 0
    other = receipts.Receipt("station-2", device.public.kid, 3, bytes(32), T0)
    assert uplink.handle_receipt(receipts.sign(other, server)) == 0  # another device's
    assert outbox.depth()[0] == 3 and uplink.counters["receipts_refused"] == 3
    assert uplink.handle_receipt(receipts.sign(receipt, server)) == 2
    assert [p.seq for p in outbox.pending()] == [3]
    outbox.close()


def test_over_the_disk_budget_health_is_thinned_and_lifecycle_events_still_sealed(tmp_path):
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sealer = Sealer(outbox, keys.generate(), "station-1", budget_bytes=10**9)
    for _ in range(20):
        sealer.seal(draft())
    size = outbox.size_bytes()
    sealer.budget_bytes = int(size / 0.9)  # 90 %: thinning, one in four kept
    kept = 0
    for _ in range(8):
        try:
            sealer.seal(draft())
            kept += 1
        except Refused as exc:
            assert exc.reason == "thinned"
    assert kept == 2 and sealer.alarm is None
    sealer.budget_bytes = size // 2  # far over: no health at all, lifecycle events sealed with an alarm
    with pytest.raises(Refused):
        sealer.seal(draft())
    seq = sealer.seal(Draft("maintenance", "label", {"code": FIELDS["health"]["code"], "action": "repair"}, T0))
    assert seq == 20 + kept + 1 and "over its disk budget" in sealer.alarm
    assert sealer.refused["thinned"] == 7
    outbox.close()


def test_what_comes_after_the_published_mark_survives_an_emptied_outbox(sealer):
    """The uplink asks for events beyond what it published; SQLite reuses row ids once the outbox is
    empty, so the mark is a sequence number per key, never a row position."""
    kid = sealer.key.public.kid
    for _ in range(3):
        sealer.seal(draft())
    assert [p.seq for p in sealer.outbox.pending(beyond={kid: 2})] == [3]
    third = envelope.envelope_hash(sealer.outbox.pending()[-1].envelope)
    assert sealer.outbox.prune(kid, 3, third) == 3
    sealer.seal(draft())  # the first row of an empty table: row id 1 again
    assert [p.seq for p in sealer.outbox.pending(beyond={kid: 3})] == [4]
    assert sealer.outbox.pending(beyond={kid: 4}) == []
    assert [p.seq for p in sealer.outbox.pending(beyond={b"another key": 9})] == [4]
