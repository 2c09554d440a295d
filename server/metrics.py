"""The server's Prometheus metrics. Labels are bounded: outcome and reason come from fixed sets; there is
no label per device or per battery (those belong in the record, not in a time series database)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()

MESSAGES = Counter(
    "bt_server_messages",
    "Messages received from devices, by outcome (accepted, rejected, duplicate).",
    ["outcome"],
    registry=REGISTRY,
)
REJECTED = Counter("bt_server_rejected", "Messages quarantined, by reason.", ["reason"], registry=REGISTRY)
QUARANTINE_DROPPED = Counter(
    "bt_server_quarantine_dropped",
    "Quarantined messages the retention limits (age, size) dropped, by reason; the record counts them too.",
    ["reason"],
    registry=REGISTRY,
)
BATCH = Histogram(
    "bt_server_batch_size",
    "Messages per committed batch.",
    registry=REGISTRY,
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
COMMIT = Histogram(
    "bt_server_commit_seconds",
    "Time to commit a batch.",
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
VERIFY = Histogram(
    "bt_server_verify_seconds",
    "Time spent checking a batch (keys, envelopes, signatures, schema), without the commit it overlaps.",
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
RECEIPTS = Counter("bt_server_receipts", "Signed receipts sent to devices.", registry=REGISTRY)
FINDINGS = Counter("bt_server_findings", "Findings raised or re-raised at intake.", registry=REGISTRY)
STORE_FAILURES = Counter(
    "bt_server_store_failures", "Store operations that failed and were retried.", registry=REGISTRY
)
REFUSED_QOS0 = Counter(
    "bt_server_refused_qos0",
    "Events published at QoS 0, refused unread: they cannot be acknowledged after commit (events are QoS 1).",
    registry=REGISTRY,
)
STATUS_REFUSED = Counter(
    "bt_server_status_refused",
    "Device statuses, or fields of them, not kept: by reason (bad_topic, too_large, not_json, not_an_object, "
    "bad_value, failed).",
    ["reason"],
    registry=REGISTRY,
)
BROKER_UP = Gauge("bt_server_broker_connected", "1 while the collector is subscribed at the broker.", registry=REGISTRY)


class DeviceGauges(Collector):
    """Devices online and enrolled, read from the record at scrape time."""

    def __init__(self) -> None:
        self.read: Callable[[], tuple[int, int]] | None = None  # set by the web app that has the store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.read is None:
            return
        try:
            online, enrolled = self.read()
        except Exception:  # a scrape must not fail because the store is away; /healthz says so
            return
        yield GaugeMetricFamily("bt_server_devices_online", "Devices whose retained status says online.", online)
        yield GaugeMetricFamily("bt_server_devices_enrolled", "Devices in the registry.", enrolled)


DEVICES = DeviceGauges()
REGISTRY.register(DEVICES)


class CrlGauge(Collector):
    """When the broker's CRL runs out ([pki] crl), read from the file at scrape time."""

    def __init__(self) -> None:
        self.read: Callable[[], float | None] | None = None  # set by `run` when [pki] crl is configured

    def collect(self) -> Iterator[GaugeMetricFamily]:
        value = self.read() if self.read is not None else None
        if value is not None:
            yield GaugeMetricFamily(
                "bt_server_crl_next_update_timestamp_seconds",
                "When the broker's CRL runs out (Unix time); the broker then refuses every client.",
                value,
            )


CRL = CrlGauge()
REGISTRY.register(CRL)
