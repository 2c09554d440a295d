"""Listens to every device's retained status (``bt/v1/+/status``) and keeps the latest in the record,
for the dashboard's device table: online or offline (the broker's last will), backlog, lag, alarm.
Status messages are what devices say about themselves, not evidence: they are kept, not verified.

A status is retained, so one that breaks the listener would break it again at every restart: each
message is handled on its own, only bounded, finite, valid values are kept (a bad field is dropped,
the rest of the status stays), and what is refused is counted (``bt_server_status_refused_total``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from battery_trace.protocol import topics
from battery_trace.server import metrics
from battery_trace.server.intake import RECONNECT_MAX_S
from battery_trace.server.pki import status_name
from battery_trace.server.store import Store, StoreUnavailable

from battery_trace.tls import TlsFiles, client_context

log = logging.getLogger(__name__)
MAX_STATUS_BYTES = 4096
MAX_BACKLOG = 10**12  # events in an outbox; far beyond any disk, well inside every integer column
MAX_LAG_S = 100 * 365 * 86400.0
MAX_TIME_MS = 10**14  # the year 5138: a device clock can be wrong, not unbounded
MAX_ALARM_CHARS = 200
STATES = ("online", "offline")


def _count(value: object, high: float) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= high


def _finite(value: object, high: float) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= high
    )


def _text(value: object) -> bool:
    """Printable, short, and encodable as UTF-8 (a JSON \\udXXX escape can decode to a lone surrogate)."""
    if value is None:
        return True  # the alarm is over
    if not isinstance(value, str) or len(value) > MAX_ALARM_CHARS or not value.isprintable():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


VALID = {
    "state": lambda v: v in STATES,
    "backlog": lambda v: _count(v, MAX_BACKLOG),
    "oldest_unreceipted_s": lambda v: _finite(v, MAX_LAG_S),
    "time": lambda v: _finite(v, MAX_TIME_MS),
    "alarm": _text,
}


def clean(status: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The fields of a status worth keeping, and the names of those refused (other keys are ignored)."""
    kept, refused = {}, []
    for name, valid in VALID.items():
        if name in status:
            if valid(status[name]):
                kept[name] = status[name]
            else:
                refused.append(name)
    return kept, refused


def client_id(collector_id: str) -> str:
    """The listener's own client id. A TLS broker makes every connection's client id its
    certificate's name (so no certificate can take over another's session), so the listener
    connects with a certificate of its own, issued with the collector's (``pki collector``)."""
    return status_name(collector_id)


def own_tls(collector_id: str, collector_tls: TlsFiles | None) -> TlsFiles | None:
    """The listener's certificate and key: CLIENT_ID-status.pem and .key next to the collector's. With
    the collector's own, the broker would close the collector's connection for the listener's."""
    if collector_tls is None or collector_tls.cert is None:
        return collector_tls
    folder = Path(collector_tls.cert).parent
    name = client_id(collector_id)
    return TlsFiles(collector_tls.ca, str(folder / f"{name}.pem"), str(folder / f"{name}.key"))


class StatusListener:
    def __init__(self, host: str, port: int, collector_id: str, store: Store, tls: TlsFiles | None = None) -> None:
        """TLS is the collector's ``tls``; the listener uses the certificate of ``own_tls``."""
        self.store = store
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id(collector_id), protocol=mqtt.MQTTv5
        )
        mine = own_tls(collector_id, tls)
        if mine:
            self.client.tls_set_context(client_context(mine))
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=RECONNECT_MAX_S)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.PREFIX}/+/status", qos=1)
        self.client.on_message = self._on_message
        self.host, self.port = host, port

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            self._keep(message.topic, message.payload)
        except Exception:  # a bug must not end the listener's thread: it would be blind from then on
            metrics.STATUS_REFUSED.labels("failed").inc()
            log.exception("a status on %r was not kept", message.topic)

    def _keep(self, topic: str, payload: bytes) -> None:
        try:
            device, _ = topics.parse(topic)
        except topics.TopicError:
            metrics.STATUS_REFUSED.labels("bad_topic").inc()
            return
        if len(payload) > MAX_STATUS_BYTES:
            self._refuse(device, "too_large", f"{len(payload)} bytes; at most {MAX_STATUS_BYTES}")
            return
        try:
            status = json.loads(payload)
        except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, an int of 5,000 digits, nested too deep
            self._refuse(device, "not_json", type(exc).__name__)
            return
        if not isinstance(status, dict):
            self._refuse(device, "not_an_object", type(status).__name__)
            return
        kept, refused = clean(status)
        if refused:
            self._refuse(device, "bad_value", ", ".join(refused), len(refused))
        try:
            self.store.record_status(device, kept, time.time())
        except StoreUnavailable as exc:
            log.warning("status of %s not kept: %s", device, exc)

    @staticmethod
    def _refuse(device: str, reason: str, detail: str, n: int = 1) -> None:
        metrics.STATUS_REFUSED.labels(reason).inc(n)
        log.warning("status of %s: %s (%s)", device, reason.replace("_", " "), detail)

    def start(self) -> None:
        self.client.connect_async(self.host, self.port)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
