"""Receipts: after a commit, tell each device how far its chain is stored, signed by the server.

A receipt is sent for every chain a batch touched, duplicates included: the device may have lost the
previous receipt, and repeating one is harmless (the watermark never goes down).
"""

from __future__ import annotations

from battery_trace.protocol import receipts, topics
from battery_trace.protocol.keys import PrivateKey, PublicKey
from battery_trace.server.store.record import Watermark


def issue(
    watermarks: dict[bytes, Watermark], server_key: PrivateKey, now_ms: int, next_key: PublicKey | None = None
) -> list[tuple[str, bytes, bytes]]:
    """(topic, signed receipt, device key id) for each chain: key id -> how far it is stored, and the hash
    there; while the server's key is being rotated, each also names the next key (signed by the current
    one). The key id lets the sender keep one pending receipt per device key."""
    return [
        (
            topics.topic(mark.device, "receipts"),
            receipts.sign(receipts.Receipt(mark.device, kid, mark.seq, mark.hash, now_ms, next_key), server_key),
            kid,
        )
        for kid, mark in watermarks.items()
    ]
