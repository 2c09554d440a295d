"""The collector's MQTT v5 link: the packet codec against bytes written from the specification, and
the session against a real mosquitto (delivery, acknowledgement per connection, receipts, flow
control, keep-alive, reconnection)."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from dataclasses import replace

import pytest
from battery_trace.server import mqtt_packets as mp
from battery_trace.server.broker_link import BrokerLink, LinkSettings
from hypothesis import given
from hypothesis import strategies as st

from harness.publisher import Publisher
from harness.waiting import wait_until
from tests.fuzzing import fuzz_mqtt

TOPIC = "$share/collectors/bt/v1/+/events"


# -- the codec ------------------------------------------------------------------------------------


def vbi(n: int) -> bytes:
    """A variable-byte integer, MQTT v5 §1.5.5: seven bits a byte, least significant first."""
    out = b""
    while True:
        n, digit = n >> 7, n & 0x7F
        out += bytes([digit | (0x80 if n else 0)])
        if not n:
            return out


def spec_publish(topic: bytes, packet_id: int, payload: bytes, props: bytes = b"", dup: bool = False) -> bytes:
    """A QoS 1 PUBLISH laid out by hand from MQTT v5 §3.3, independently of the encoder."""
    body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", packet_id) + vbi(len(props)) + props + payload
    return bytes([0x32 | (0x08 if dup else 0)]) + vbi(len(body)) + body


def test_a_publish_written_from_the_spec_decodes_with_its_properties_skipped():
    props = b"\x01\x01" + b"\x26" + struct.pack(">H", 3) + b"key" + struct.pack(">H", 200) + b"v" * 200
    raw = spec_publish(b"bt/v1/station-1/events", 513, b"\xd2\x84payload", props, dup=True)
    (packet,) = mp.Splitter(1 << 20).feed(raw)
    message = mp.decode_publish(*packet)
    assert message == mp.Message("bt/v1/station-1/events", b"\xd2\x84payload", 1, 513, dup=True)


def test_the_encoders_lay_packets_out_as_the_spec_says():
    assert mp.puback(0x1234) == b"\x40\x02\x12\x34"
    assert mp.subscribe(7, "a/b", 1) == b"\x82\x09\x00\x07\x00\x00\x03a/b\x01"
    assert mp.publish("t", b"xy", 9) == b"\x32\x08\x00\x01t\x00\x09\x00xy"
    connect = mp.connect("c1", keepalive=30, clean_start=False, session_expiry=300, receive_maximum=2000,
                         maximum_packet=1 << 20)  # fmt: skip
    assert connect[2:10] == b"\x00\x04MQTT\x05\x00"  # protocol name, version 5, no clean start
    assert b"\x11\x00\x00\x01\x2c" in connect and b"\x21\x07\xd0" in connect and b"\x27\x00\x10\x00\x00" in connect
    assert connect.endswith(b"\x00\x02c1")


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), max_size=40))
def test_packets_are_framed_by_their_length_however_the_stream_is_cut(payloads, cuts):
    stream = b"".join(spec_publish(b"bt/v1/d/events", i + 1, p) for i, p in enumerate(payloads))
    splitter, got, pos = mp.Splitter(1 << 20), [], 0
    for cut in [*cuts, len(stream)]:
        got += splitter.feed(stream[pos : pos + cut])
        pos += cut
    got += splitter.feed(stream[pos:])
    assert [mp.decode_publish(*p).payload for p in got] == payloads
    assert splitter.buffered == 0


@given(st.binary(max_size=600))
def test_hostile_bytes_from_a_broker_are_refused_with_a_packet_error_only(data):
    fuzz_mqtt(data)  # raises anything but PacketError only on a bug


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "longer than four bytes"),
        (b"\x30\xff\xff\x7f", "over this client's limit"),
        (b"\x34\x05\x00\x01t\x00\x01", "QoS 2"),
        (b"\x32\x04\x00\x09ab", "the topic and packet id need"),
        (b"\x32\x07\x00\x01t\x00\x00\x00x", "packet id 0"),
        (b"\x30\x05\x00\x01t\x09x", "properties run past"),
    ],
)
def test_malformed_packets_say_what_is_wrong(stream, says):
    with pytest.raises(mp.PacketError, match=says):
        for packet in mp.Splitter(1 << 16).feed(stream):
            mp.decode_publish(*packet)


def test_connack_and_disconnect_carry_their_reasons():
    props = b"\x21\x00\x14" + b"\x1f\x00\x04busy"
    connack = mp.decode_connack(b"\x01\x89" + bytes([len(props)]) + props)
    assert (connack.session_present, connack.reason, connack.receive_maximum) == (True, 0x89, 20)
    assert connack.reason_string == "busy" and mp.reason_text(connack.reason) == "server busy"
    assert mp.decode_disconnect(b"\x8e\x00") == (0x8E, None)
    with pytest.raises(mp.PacketError, match="unknown property identifier 0x7f"):
        mp.decode_connack(b"\x00\x00\x02\x7f\x00")


# -- the session, on a real broker ----------------------------------------------------------------


class Received:
    def __init__(self) -> None:
        self.items: list[tuple[int, mp.Message]] = []
        self.lock = threading.Lock()

    def __call__(self, generation: int, messages: list[mp.Message]) -> None:
        with self.lock:
            self.items += [(generation, m) for m in messages]

    def take(self) -> list[tuple[int, mp.Message]]:
        with self.lock:
            out, self.items = self.items, []
        return out


def link(broker, received, client_id="link-1", **overrides) -> BrokerLink:
    settings = LinkSettings(broker.host, broker.port, client_id, TOPIC, session_expiry_s=600, receive_maximum=50)
    return BrokerLink(replace(settings, **overrides), received)


def events(n: int, tag: str = "e") -> list[tuple[str, bytes]]:
    return [(f"bt/v1/station-{i % 3}/events", f"{tag}{i}".encode()) for i in range(n)]


@pytest.mark.integration
def test_acknowledged_messages_are_not_delivered_again_and_the_others_are(broker):
    received = Received()
    first = link(broker, received)
    first.start()
    wait_until(first.subscribed.is_set, 10, "the subscription")
    publisher = Publisher(broker, "devices")
    publisher.publish(events(40))
    wait_until(lambda: len(received.items) == 40, 10, "40 messages")
    got = received.take()
    generation = got[0][0]
    assert first.ack(generation, [m.packet_id for _, m in got[:25]]) == 25
    first.stop()  # the last 15 were never acknowledged: they belong to the broker again
    second = link(broker, received)
    second.start()
    wait_until(lambda: len(received.items) == 15, 10, "the 15 unacknowledged messages again")
    again = received.take()
    assert sorted(m.payload for _, m in again) == sorted(m.payload for _, m in got[25:])
    # An acknowledgement for a message of an earlier connection is not sent on this one.
    assert second.ack(generation, [got[0][1].packet_id]) == 0
    assert second.ack(again[0][0], [m.packet_id for _, m in again]) == 15
    second.stop()
    third = link(broker, received)
    third.start()
    wait_until(third.subscribed.is_set, 10, "the subscription")
    time.sleep(1)
    assert received.items == []  # everything acknowledged stays acknowledged
    third.stop()
    publisher.close()


@pytest.mark.integration
def test_a_broker_that_sends_beyond_the_receive_maximum_is_held_back(broker):
    """mosquitto 2.0.11 sends about twice as many as were acknowledged; the link stops reading instead
    of buffering, so what it holds unacknowledged stays near the Receive Maximum."""
    received = Received()
    lk = link(broker, received, receive_maximum=20)
    lk.start()
    wait_until(lk.subscribed.is_set, 10, "the subscription")
    publisher = Publisher(broker, "devices")
    publisher.publish(events(600, tag="x" * 1000), timeout=30)
    held, total = [], 0
    deadline = time.monotonic() + 30
    while total < 600 and time.monotonic() < deadline:
        time.sleep(0.02)
        batch = received.take()
        held.append(len(batch))
        total += len(batch)
        by_generation: dict[int, list[int]] = {}
        for generation, m in batch:
            by_generation.setdefault(generation, []).append(m.packet_id)
        for generation, ids in by_generation.items():
            lk.ack(generation, ids)
    assert total == 600
    # One socket read (64 KiB, about 60 of these messages) may carry more than the Receive Maximum.
    assert max(held) <= 20 + 70, held
    lk.stop()
    publisher.close()


@pytest.mark.integration
def test_receipts_reach_their_device_and_the_newest_one_wins(broker):
    device = Publisher(broker, "station-1", subscribe="bt/v1/station-1/receipts")
    lk = link(broker, Received())
    lk.start()
    wait_until(lk.subscribed.is_set, 10, "the subscription")
    for n in range(300):
        lk.publish("bt/v1/station-1/receipts", f"watermark {n}".encode())
    wait_until(lambda: device.received and device.received[-1].payload == b"watermark 299", 10, "the last receipt")
    payloads = [m.payload for m in device.received]
    assert len(payloads) <= 300 and payloads == sorted(payloads, key=lambda p: int(p.split()[1]))
    lk.stop()
    device.close()


@pytest.mark.integration
def test_a_silent_broker_is_noticed_by_keep_alive_and_the_link_comes_back(broker):
    received = Received()
    lk = link(broker, received, keepalive_s=2)
    disconnects: list[str] = []
    lk.on_disconnected = disconnects.append
    lk.start()
    wait_until(lk.subscribed.is_set, 10, "the subscription")
    os.kill(broker.process.pid, signal.SIGSTOP)  # the broker hangs: the TCP connection stays open
    try:
        wait_until(lambda: disconnects, 10, "the keep-alive to notice the silence")
        assert "keep-alive" in disconnects[0]
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    wait_until(lk.subscribed.is_set, 15, "the subscription again")
    publisher = Publisher(broker, "devices")
    publisher.publish(events(5))
    wait_until(lambda: len(received.items) == 5, 10, "messages after the reconnection")
    lk.stop()
    publisher.close()


@pytest.mark.integration
def test_the_link_waits_for_a_broker_that_is_down_and_connects_when_it_is_up(broker):
    broker.stop()
    received = Received()
    lk = link(broker, received)
    lk.start()
    time.sleep(1.5)
    assert not lk.subscribed.is_set()
    broker.start()
    wait_until(lk.subscribed.is_set, 10, "the subscription once the broker is up")
    lk.stop()
