"""Listens to every device's retained status (``bt/v1/+/status``) and keeps the latest in the record,
for the dashboard's device table: online or offline (the broker's last will), backlog, lag, alarm.
Status messages are what devices say about themselves, not evidence: they are kept, not verified."""

from __future__ import annotations

import json
import logging
import time

import paho.mqtt.client as mqtt
from battery_trace.protocol import topics
from battery_trace.server.intake import RECONNECT_MAX_S
from battery_trace.server.store import Store, StoreUnavailable

from battery_trace.tls import TlsFiles, client_context

log = logging.getLogger(__name__)
MAX_STATUS_BYTES = 4096


class StatusListener:
    def __init__(self, host: str, port: int, client_id: str, store: Store, tls: TlsFiles | None = None) -> None:
        self.store = store
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if tls:
            self.client.tls_set_context(client_context(tls))
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=RECONNECT_MAX_S)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.PREFIX}/+/status", qos=1)
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            device, _ = topics.parse(message.topic)
        except topics.TopicError:
            return
        if len(message.payload) > MAX_STATUS_BYTES:
            return
        try:
            status = json.loads(message.payload)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(status, dict):
            try:
                self.store.record_status(device, status, time.time())
            except StoreUnavailable as exc:
                log.warning("status of %s not kept: %s", device, exc)

    def start(self) -> None:
        self.client.connect_async(self.host, self.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
