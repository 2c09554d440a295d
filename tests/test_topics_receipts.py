"""Topics and device ids; receipts that only the configured server key can issue."""

import re

import pytest
from battery_trace.protocol import cbor, envelope, keys, receipts, topics


def test_topics_of_the_contract():
    assert topics.topic("station-7", "events") == "bt/v1/station-7/events"
    assert topics.parse("bt/v1/station-7/receipts") == ("station-7", "receipts")
    assert topics.SHARED_EVENTS == "$share/collectors/bt/v1/+/events"


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ("", "empty"),
        ("Station-7", "use 'station-7'"),
        ("station/7", "'/'"),
        ("station+", "'+'"),
        ("#", "'#'"),
        ("-station", "start and end"),
        ("s" * 65, "65 characters"),
    ],
)
def test_bad_device_ids_say_what_is_valid(device, fragment):
    with pytest.raises(topics.TopicError, match=re.escape(fragment)):
        topics.topic(device, "events")


@pytest.mark.parametrize("name", ["bt/v1/a/b/events", "bt/v2/a/events", "bt/v1/a/commands", "bt/v1//events"])
def test_foreign_topics_are_refused(name):
    with pytest.raises(topics.TopicError):
        topics.parse(name)


def test_receipt_from_the_server_key_is_accepted_and_others_are_not():
    server, device_key = keys.generate(), keys.generate()
    kid = device_key.public.kid
    data = receipts.sign(receipts.Receipt("station-1", kid, 41, b"h" * 32, 1_767_225_600_000), server)
    assert receipts.verify(data, [server.public], "station-1", {kid}).watermark == 41
    assert receipts.verify(data, [server.public], "station-1", {b"old", kid}).hash == b"h" * 32  # a rotated key's
    with pytest.raises(receipts.ReceiptError, match="does not trust"):
        receipts.verify(data, [keys.generate().public], "station-1", {kid})  # signed by a key not trusted
    impostor = keys.generate()
    claimed = cbor.encode({1: -8, 4: server.public.kid})  # names the server's key, signed by another
    payload = envelope.decode(data).payload
    forged = cbor.encode(cbor.Tag(18, [claimed, {}, payload, impostor.sign(envelope._sig_structure(claimed, payload))]))
    with pytest.raises(receipts.ReceiptError, match="does not verify"):
        receipts.verify(forged, [server.public], "station-1", {kid})
    with pytest.raises(receipts.ReceiptError, match="not a key of this device"):
        receipts.verify(data, [server.public], "station-2", {kid})
    with pytest.raises(receipts.ReceiptError, match="not a key of this device"):
        receipts.verify(data, [server.public], "station-1", {keys.generate().public.kid})


@pytest.mark.parametrize(("watermark", "digest"), [(3, b"short"), (3, None), (0, b"h" * 32)])
def test_a_receipt_must_name_the_hash_at_its_watermark(watermark, digest):
    server, kid = keys.generate(), keys.generate().public.kid
    m = {"v": 1, "type": "receipt", "device": "station-1", "kid": kid, "watermark": watermark, "time": 1}
    if digest is not None:
        m["hash"] = digest
    with pytest.raises(receipts.ReceiptError, match="hash"):
        receipts.verify(envelope.sign(cbor.encode(m), server), [server.public], "station-1", {kid})


def test_an_event_signed_by_the_server_is_not_a_receipt():
    server = keys.generate()
    data = envelope.sign(b"\xa1\x64type\x65event", server)
    with pytest.raises(receipts.ReceiptError, match="not a version-1 receipt"):
        receipts.verify(data, [server.public], "station-1", {b"k"})
