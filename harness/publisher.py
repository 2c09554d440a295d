"""Publishing sealed envelopes to a broker the way devices do (QoS 1), and collecting their receipts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import paho.mqtt.client as mqtt

from harness.broker import Broker


class Publisher:
    """One MQTT v5 connection that publishes many messages and waits until the broker has them all."""

    def __init__(self, broker: Broker, client_id: str, subscribe: str | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.received: list[mqtt.MQTTMessage] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        if subscribe:
            self.client.on_connect = lambda c, *a: c.subscribe(subscribe, qos=1)
            self.client.on_subscribe = lambda *a: self._subscribed.set()
            self.client.on_message = self._on_message
        else:
            self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("subscription not confirmed")

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append(message)

    def publish(self, items: Iterable[tuple[str, bytes]], timeout: float = 60) -> int:
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in items]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
