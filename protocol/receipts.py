"""Receipts: the server's signed statement that a device's chain is stored up to a sequence number.

A receipt is the only thing that lets an agent delete an event from its outbox, so the agent accepts
one only when it is signed by the configured server key and names this device and one of the keys it
holds a chain of (a rotated-out key's backlog is receipted under that key). A receipt says exactly what
it covers: the watermark and the envelope hash of the event at it. Stored events up to the watermark
each link to the one before, so when that hash is the agent's own event's, by the hash chain every
event up to it is the agent's own; when it is not, the server holds another chain under the same key
(a restored or cloned outbox) and the agent prunes nothing.

The server's key can change without stopping receipts: while a next key is configured, every receipt
names it (``next_key``), signed by the current key, and an agent that verifies such a receipt trusts the
next key from then on (it keeps it beside its outbox). Once the fleet has heard it, the server signs
with the next key (docs/operator-guide.md, "Rotate the server's key"). Only the key an agent is
configured with may announce one, and what it announced is trusted only while it is the configured key:
re-provisioning the configured key after a leak drops whatever the leaked key announced.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from battery_trace.protocol import cbor, envelope, keys
from battery_trace.protocol.events import HASH_LENGTH, MAX_SEQ, SCHEMA_VERSION, ZERO_HASH
from battery_trace.protocol.keys import PrivateKey, PublicKey
from battery_trace.protocol.topics import device_id_problem

RECEIPT_TYPE = "receipt"


class ReceiptError(ValueError):
    pass


@dataclass(frozen=True)
class Receipt:
    device: str
    kid: bytes  # the device key whose chain this covers (sequence numbers are per key)
    watermark: int  # every event of that chain with seq <= watermark is stored, each linked to the one before
    hash: bytes  # the envelope hash of the event at the watermark (zeros when the watermark is 0)
    time_ms: int
    next_key: PublicKey | None = None  # the key the server will sign with next, vouched for by this receipt
    signer: bytes | None = None  # the key id that signed it (set by verify; not part of the payload)

    def to_map(self) -> dict[str, object]:
        return {
            "v": SCHEMA_VERSION,
            "type": RECEIPT_TYPE,
            "device": self.device,
            "kid": self.kid,
            "watermark": self.watermark,
            "hash": self.hash,
            "time": self.time_ms,
            **({"next_key": self.next_key.raw} if self.next_key is not None else {}),
        }


def sign(receipt: Receipt, server_key: PrivateKey) -> bytes:
    return envelope.sign(cbor.encode(receipt.to_map()), server_key)


def verify(data: bytes, server_keys: Sequence[PublicKey], device: str, device_kids: Collection[bytes]) -> Receipt:
    """Check a receipt's signature against the server key it names (one of ``server_keys``, the keys the
    caller trusts) and that it speaks of this device and one of ``device_kids``; raise ReceiptError
    otherwise. Whether it covers the caller's own events is the caller's question (the hash at the
    watermark against its own event there)."""
    try:
        env = envelope.decode(data)
        signer = next((k for k in server_keys if k.kid == env.kid), None)
        if signer is None:
            raise ReceiptError("receipt refused: signed by a key this device does not trust as the server's")
        envelope.verify(env, signer)
        m = cbor.decode(env.payload, deterministic=True)
    except (envelope.EnvelopeError, cbor.CborError) as exc:
        raise ReceiptError(f"receipt refused: {exc}") from None
    if not isinstance(m, dict) or m.get("type") != RECEIPT_TYPE or m.get("v") != SCHEMA_VERSION:
        raise ReceiptError("receipt refused: payload is not a version-1 receipt")
    fields = (m.get("device"), m.get("kid"), m.get("watermark"), m.get("hash"), m.get("time"))
    dev, kid, watermark, digest, time_ms = fields
    if not isinstance(dev, str) or device_id_problem(dev):
        raise ReceiptError("receipt refused: no valid device id")
    if not isinstance(kid, bytes) or not isinstance(time_ms, int):
        raise ReceiptError("receipt refused: kid or time missing")
    if not isinstance(watermark, int) or isinstance(watermark, bool) or not 0 <= watermark <= MAX_SEQ:
        raise ReceiptError("receipt refused: watermark is not a sequence number")
    if not isinstance(digest, bytes) or len(digest) != HASH_LENGTH or (watermark == 0 and digest != ZERO_HASH):
        raise ReceiptError(f"receipt refused: hash must be the {HASH_LENGTH}-byte envelope hash at the watermark")
    if dev != device or kid not in device_kids:
        raise ReceiptError(f"receipt refused: it is for {dev}/{kid.hex()}, not a key of this device's outbox")
    next_raw = m.get("next_key")
    try:
        next_key = None if next_raw is None else PublicKey(next_raw)
    except (keys.InvalidKey, TypeError):
        raise ReceiptError("receipt refused: next_key is not an Ed25519 public key") from None
    return Receipt(dev, kid, watermark, digest, time_ms, next_key, signer.kid)
