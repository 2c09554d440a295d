"""The uplink: publishes the outbox in sealing order and prunes only what signed receipts cover.

MQTT v5, QoS 1, a persistent session under the device's id. Delivery is at-least-once by design:
an event is published, and published again after ``resend_after_s`` until a receipt signed by the
server covers it; the server stores each (key, sequence) once. A receipt that does not verify
against the configured server key, or names another device or key, prunes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from battery_trace.agent.outbox import Outbox
from battery_trace.protocol import receipts, topics
from battery_trace.protocol.keys import PublicKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from battery_trace.tls import TlsFiles, client_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    resend_after_s: float = 30.0
    session_expiry_s: int = 7 * 24 * 3600
    max_in_flight: int = 200
    tls: TlsFiles | None = None  # when set, TLS is mandatory: there is no plaintext fallback
    username: str | None = None
    password: str | None = None


def client_id(device: str) -> str:
    """The device's one client id, under which the broker keeps its session: the device id. A TLS
    broker gives every connection its certificate's name as client id (use_username_as_clientid,
    so no certificate can take over another's session), so asking for the same name keeps the session
    in the same place on a loopback broker. One certificate, one connection: ``battery-agent emit``
    on a device shares this id with the device's agent."""
    return device


class Uplink:
    def __init__(
        self, settings: MqttSettings, outbox: Outbox, device: str, device_kid: bytes, server_key: PublicKey
    ) -> None:
        self.settings = settings
        self.client_id = client_id(device)
        self.outbox = outbox
        self.device = device
        self.kid = device_kid
        # The configured server key, and the ones learned since from receipts it (or a learned one)
        # signed: a rotation of the server's key does not stop receipts.
        self.configured_key = server_key
        learned = outbox.server_keys(vouched_by=server_key.raw)
        self.server_keys = [server_key, *(PublicKey(raw) for raw in learned if raw != server_key.raw)]
        self.wake = asyncio.Event()  # set when something was sealed or a receipt arrived
        self.sent: dict[tuple[bytes, int], float] = {}  # (kid, seq) -> when last published
        self.counters: Counter[str] = Counter()
        self.connected = False
        self.extra_status: Callable[[], dict[str, Any]] = dict  # what the rest of the agent adds to its status
        self._status_at = 0.0  # when the retained status was last published
        self.alarm: str | None = None  # a receipt spoke of a chain under our key that is not this outbox's

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
            tls_context=client_context(s.tls) if s.tls else None,
            max_inflight_messages=s.max_in_flight,
            username=s.username,
            password=s.password,
            timeout=10,
        )

    async def run(self, status_interval_s: float = 30.0) -> None:
        """Stay connected forever: reconnect with capped exponential backoff, counting each attempt. Each
        wait is drawn between half and all of the backoff, so a fleet that lost its broker together does
        not come back in one burst."""
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
                log.warning("broker connection lost or refused (%s); retrying within %.1f s", exc, backoff)
            finally:
                self.connected = False
            self.sent.clear()  # whatever was in flight is resent on the next session
            await asyncio.sleep(random.uniform(backoff / 2, backoff))  # spreads a fleet; not a secret
            backoff = min(backoff * 2, 30.0)

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(topics.topic(self.device, "receipts"), qos=1)
        await self._publish_status(client)
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
            if time.monotonic() - self._status_at >= 1.0:  # a backlog drains with many receipts a second
                await self._publish_status(client)

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        self._status_at = time.monotonic()
        await client.publish(topics.topic(self.device, "status"), self.status("online"), qos=1, retain=True)

    async def _report(self, client: aiomqtt.Client) -> None:
        """Refresh the retained status now and then, so operators see the backlog move."""
        while True:
            await asyncio.sleep(getattr(self, "status_interval_s", 30.0))
            await self._publish_status(client)

    def handle_receipt(self, data: bytes) -> int:
        """Verify a receipt and prune what it covers; return how many events left the outbox."""
        try:
            receipt = receipts.verify(data, self.server_keys, self.device, self.outbox.kids())
        except receipts.ReceiptError as exc:
            self.counters["receipts_refused"] += 1
            log.warning("%s", exc)
            return 0
        self.counters["receipts"] += 1
        announced = receipt.next_key
        # Only the configured key announces: a learned key cannot vouch for another, so a leaked key's
        # announcement ends when the configured key is re-provisioned.
        if announced is not None and receipt.signer == self.configured_key.kid and announced not in self.server_keys:
            if self.outbox.learn_server_key(announced.raw, vouched_by=self.configured_key.raw):
                log.info("the server announced its next key %s; receipts it signs are trusted", receipt.next_key.hex)
            self.server_keys.append(announced)
            self.counters["server_keys_learned"] += 1
        pruned = self.outbox.prune(receipt.kid, receipt.watermark, receipt.hash)
        if pruned is None:
            self._foreign_chain(receipt)
            return 0
        for key in [k for k in self.sent if k[0] == receipt.kid and k[1] <= receipt.watermark]:
            del self.sent[key]
        self.counters["pruned"] += pruned
        self.wake.set()
        return pruned

    def _foreign_chain(self, receipt: receipts.Receipt) -> None:
        """The server holds a chain under this key that is not this outbox's: its new events are
        quarantined there (sequence_reused or chain_break) and stay here, evidence on both sides. Only a
        new key ends it; say so where an operator looks: the alarm (status, /healthz, /metrics), the log."""
        self.counters["receipts_foreign_chain"] += 1
        alarm = (
            f"the server's chain of key {receipt.kid.hex()} up to seq {receipt.watermark} is not this outbox's "
            "(a restored or cloned outbox under the same key?): nothing pruned, every event kept; "
            "give this device a new key (battery-agent keygen, battery-server devices rotate)"
        )
        if alarm != self.alarm:
            log.error("%s", alarm)
        self.alarm = alarm

    async def _publish(self, client: aiomqtt.Client) -> None:
        """Publish what is new in the outbox, a window of ``max_in_flight`` at a time, and again what a
        receipt has not covered within ``resend_after_s``. New events do not wait for receipts of the
        previous window (only for its broker acknowledgements), so a backlog drains at the broker's
        pace rather than one receipt round trip per window."""
        events_topic = topics.topic(self.device, "events")
        published: dict[bytes, int] = {}  # per key, the highest sequence number published in this session
        window = self.settings.max_in_flight
        while True:
            self.wake.clear()
            resend_before = time.monotonic() - self.settings.resend_after_s
            due = [
                p
                for p in self.outbox.pending(limit=window)
                if (p.kid, p.seq) in self.sent and self.sent[(p.kid, p.seq)] < resend_before
            ]
            fresh = self.outbox.pending(limit=window - len(due), beyond=published)
            self.counters["resent"] += len(due)
            for item in (*due, *fresh):
                self.sent[(item.kid, item.seq)] = time.monotonic()
            for p in fresh:
                published[p.kid] = p.seq
            # The window at once, in outbox order, its acknowledgements awaited together: awaiting each
            # in turn would cap a backlog's drain at one broker round trip per event.
            await asyncio.gather(*(client.publish(events_topic, p.envelope, qos=1) for p in (*due, *fresh)))
            self.counters["published"] += len(due) + len(fresh)
            if len(due) + len(fresh) == window:
                continue  # more may be waiting
            wait: Any = self.settings.resend_after_s
            if self.sent:
                wait = max(0.05, min(self.sent.values()) + self.settings.resend_after_s - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=wait)
