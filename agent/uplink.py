"""The uplink: publishes the outbox in sealing order and prunes only what signed receipts cover.

MQTT v5, QoS 1, a persistent session under a stable client id. Delivery is at-least-once by design:
an event is published, and published again after ``resend_after_s`` until a receipt signed by the
server covers it; the server stores each (key, sequence) once. A receipt that does not verify
against the configured server key, or names another device or key, prunes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.outbox import Outbox
from protocol import receipts, topics
from protocol.keys import PublicKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    resend_after_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600
    max_in_flight: int = 200
    tls_ca: str | None = None  # when set, TLS is mandatory: there is no plaintext fallback
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = None


def tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    if settings.tls_ca is None:
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca)
    if settings.tls_cert:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


class Uplink:
    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        device: str,
        device_kid: bytes,
        server_key: PublicKey,
        client_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.client_id = client_id or f"bt-agent-{device}"  # stable: the broker keeps the session under it
        self.outbox = outbox
        self.device = device
        self.kid = device_kid
        self.server_key = server_key
        self.wake = asyncio.Event()  # set when something was sealed or a receipt arrived
        self.sent: dict[tuple[bytes, int], float] = {}  # (kid, seq) -> when last published
        self.counters: Counter[str] = Counter()
        self.connected = False
        self.extra_status: Callable[[], dict[str, Any]] = dict  # what the rest of the agent adds to its status

    def notify(self) -> None:
        """Called by the sealer's side after each seal: publish without waiting for the next tick."""
        self.wake.set()

    def status(self, state: str) -> bytes:
        depth, oldest = self.outbox.depth()
        return json.dumps(
            {
                "state": state,
                "backlog": depth,
                "oldest_unreceipted_s": round(time.time() - oldest, 1) if oldest else 0.0,
                "time": int(time.time() * 1000),
                **self.extra_status(),
            }
        ).encode()

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        connect = Properties(PacketTypes.CONNECT)
        connect.SessionExpiryInterval = s.session_expiry_s
        will = aiomqtt.Will(
            topics.topic(self.device, "status"), json.dumps({"state": "offline"}).encode(), qos=1, retain=True
        )
        return aiomqtt.Client(
            s.host,
            s.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=s.session_expiry_s == 0,
            properties=connect,
            keepalive=s.keepalive_s,
            will=will,
            tls_context=tls_context(s),
            username=s.username,
            password=s.password,
            timeout=10,
        )

    async def run(self, status_interval_s: float = 30.0) -> None:
        """Stay connected forever: reconnect with capped exponential backoff, counting each attempt."""
        self.status_interval_s = status_interval_s
        backoff = 0.5
        while True:
            try:
                async with self._client() as client:
                    self.connected = True
                    self.counters["connects"] += 1
                    backoff = 0.5
                    log.info("connected to %s:%s", self.settings.host, self.settings.port)
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self.counters["disconnects"] += 1
                log.warning("broker connection lost or refused (%s); retrying in %.1f s", exc, backoff)
            finally:
                self.connected = False
            self.sent.clear()  # whatever was in flight is resent on the next session
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(topics.topic(self.device, "receipts"), qos=1)
        await client.publish(topics.topic(self.device, "status"), self.status("online"), qos=1, retain=True)
        # Not a TaskGroup: its ExceptionGroup would hide the MqttError that run() reconnects on.
        tasks = {
            asyncio.create_task(self._receive(client)),
            asyncio.create_task(self._publish(client)),
            asyncio.create_task(self._report(client)),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # re-raises the connection error

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            self.handle_receipt(bytes(payload))
            await client.publish(topics.topic(self.device, "status"), self.status("online"), qos=1, retain=True)

    async def _report(self, client: aiomqtt.Client) -> None:
        """Refresh the retained status now and then, so operators see the backlog move."""
        while True:
            await asyncio.sleep(getattr(self, "status_interval_s", 30.0))
            await client.publish(topics.topic(self.device, "status"), self.status("online"), qos=1, retain=True)

    def handle_receipt(self, data: bytes) -> int:
        """Verify a receipt and prune what it covers; return how many events left the outbox."""
        try:
            receipt = receipts.verify(data, self.server_key, self.device, self.kid)
        except receipts.ReceiptError as exc:
            self.counters["receipts_refused"] += 1
            log.warning("%s", exc)
            return 0
        self.counters["receipts"] += 1
        pruned = self.outbox.prune(receipt.kid, receipt.watermark)
        for key in [k for k in self.sent if k[0] == receipt.kid and k[1] <= receipt.watermark]:
            del self.sent[key]
        self.counters["pruned"] += pruned
        self.wake.set()
        return pruned

    async def _publish(self, client: aiomqtt.Client) -> None:
        events_topic = topics.topic(self.device, "events")
        while True:
            self.wake.clear()
            now = time.monotonic()
            resend_before = now - self.settings.resend_after_s
            due = [
                p
                for p in self.outbox.pending(limit=self.settings.max_in_flight)
                if self.sent.get((p.kid, p.seq), -1e18) < resend_before
            ]
            for item in due:
                if (item.kid, item.seq) in self.sent:
                    self.counters["resent"] += 1
                await client.publish(events_topic, item.envelope, qos=1)
                self.sent[(item.kid, item.seq)] = time.monotonic()
                self.counters["published"] += 1
            wait: Any = self.settings.resend_after_s
            if self.sent:
                wait = max(0.05, min(self.sent.values()) + self.settings.resend_after_s - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=wait)
