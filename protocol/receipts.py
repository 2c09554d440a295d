"""Receipts: the server's signed statement that a device's chain is stored up to a sequence number.

A receipt is the only thing that lets an agent delete an event from its outbox, so the agent accepts
one only when it is signed by the configured server key and names this device and this device key.
"""

from __future__ import annotations

from dataclasses import dataclass

from battery_trace.protocol import cbor, envelope
from battery_trace.protocol.events import MAX_SEQ, SCHEMA_VERSION
from battery_trace.protocol.keys import PrivateKey, PublicKey
from battery_trace.protocol.topics import device_id_problem

RECEIPT_TYPE = "receipt"


class ReceiptError(ValueError):
    pass


@dataclass(frozen=True)
class Receipt:
    device: str
    kid: bytes  # the device key whose chain this covers (sequence numbers are per key)
    watermark: int  # every event of that chain with seq <= watermark is stored
    time_ms: int

    def to_map(self) -> dict[str, object]:
        return {
            "v": SCHEMA_VERSION,
            "type": RECEIPT_TYPE,
            "device": self.device,
            "kid": self.kid,
            "watermark": self.watermark,
            "time": self.time_ms,
        }


def sign(receipt: Receipt, server_key: PrivateKey) -> bytes:
    return envelope.sign(cbor.encode(receipt.to_map()), server_key)


def verify(data: bytes, server_key: PublicKey, device: str, device_kid: bytes) -> Receipt:
    """Check a receipt's signature and that it speaks of this device's key; raise ReceiptError otherwise."""
    try:
        env = envelope.verify(data, server_key)
        m = cbor.decode(env.payload, deterministic=True)
    except (envelope.EnvelopeError, cbor.CborError) as exc:
        raise ReceiptError(f"receipt refused: {exc}") from None
    if not isinstance(m, dict) or m.get("type") != RECEIPT_TYPE or m.get("v") != SCHEMA_VERSION:
        raise ReceiptError("receipt refused: payload is not a version-1 receipt")
    fields = (m.get("device"), m.get("kid"), m.get("watermark"), m.get("time"))
    dev, kid, watermark, time_ms = fields
    if not isinstance(dev, str) or device_id_problem(dev):
        raise ReceiptError("receipt refused: no valid device id")
    if not isinstance(kid, bytes) or not isinstance(time_ms, int):
        raise ReceiptError("receipt refused: kid or time missing")
    if not isinstance(watermark, int) or isinstance(watermark, bool) or not 0 <= watermark <= MAX_SEQ:
        raise ReceiptError("receipt refused: watermark is not a sequence number")
    if dev != device or kid != device_kid:
        raise ReceiptError(f"receipt refused: it is for {dev}/{kid.hex()}, not this device's key")
    return Receipt(dev, kid, watermark, time_ms)
