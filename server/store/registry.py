"""The registry: devices, their role, and their keys' lifecycle (active, retired by rotation, revoked).

A device has one role for life; a new role is a new device. Rotating gives a device a new active key
and retires the old one from that moment: events the old key sealed before the rotation are still
accepted when they arrive later (a station may have been offline), later ones are not. Revoking is
for a key that can no longer be trusted: nothing it signs is accepted from the revocation time on,
and when that time lies in the past, what was already stored since then is flagged.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from battery_trace.protocol.keys import PublicKey
from battery_trace.server.records import KeyRecord
from battery_trace.server.store.db import StoreError, Tx

KEY_STATES = ("active", "retired", "revoked")

_KEY_COLUMNS = "k.kid, k.device, d.role, k.public_key, k.state, k.valid_from, k.valid_until, k.revoked_at"


def _record(row: tuple) -> KeyRecord:
    return KeyRecord(row[0], row[1], row[2], _public(bytes(row[3])), *row[4:])


@functools.lru_cache(maxsize=65536)
def _public(raw: bytes) -> PublicKey:
    # The intake looks up every key of every batch (a revocation must count at once), and checking that
    # a stored key is a sound curve point costs more than the lookup: each distinct key is built once.
    return PublicKey(raw)


def _check_new_key(tx: Tx, public: PublicKey) -> None:
    owner = tx.value("SELECT device FROM keys WHERE kid = ?", (public.kid,))
    if owner is not None:
        raise StoreError(f"key {public.kid.hex()} is already enrolled (for {owner}); every device needs its own key")


def enroll(tx: Tx, device: str, role: str, public: PublicKey, org: str | None, at: float) -> KeyRecord:
    existing = tx.value("SELECT role FROM devices WHERE device = ?", (device,))
    if existing is not None:
        raise StoreError(
            f"{device} is already enrolled as {existing}; to give it a new key: battery-server devices rotate "
            f"{device} --key NEWKEY"
        )
    _check_new_key(tx, public)
    tx.execute("INSERT INTO devices (device, role, org, enrolled_at) VALUES (?, ?, ?, ?)", (device, role, org, at))
    tx.execute(
        "INSERT INTO keys (kid, device, public_key, state, valid_from) VALUES (?, ?, ?, 'active', ?)",
        (public.kid, device, public.raw, at),
    )
    return key(tx, public.kid)  # type: ignore[return-value]


def rotate(tx: Tx, device: str, public: PublicKey, at: float) -> KeyRecord:
    if tx.value(f"SELECT role FROM devices WHERE device = ?{tx.dialect.for_update}", (device,)) is None:
        raise StoreError(f"{device} is not enrolled; enrol it first: battery-server devices enroll")
    _check_new_key(tx, public)
    tx.execute("UPDATE keys SET state = 'retired', valid_until = ? WHERE device = ? AND state = 'active'", (at, device))
    tx.execute(
        "INSERT INTO keys (kid, device, public_key, state, valid_from) VALUES (?, ?, ?, 'active', ?)",
        (public.kid, device, public.raw, at),
    )
    return key(tx, public.kid)  # type: ignore[return-value]


def revoke(tx: Tx, target: str, at: float) -> list[KeyRecord]:
    """Revoke a device's keys (``target`` is a device id) or one key (a key id in hex)."""
    rows = tx.all("SELECT kid FROM keys WHERE device = ? AND state <> 'revoked'", (target,))
    if not rows:
        try:
            kid = bytes.fromhex(target)
        except ValueError:
            kid = b""
        rows = tx.all("SELECT kid FROM keys WHERE kid = ? AND state <> 'revoked'", (kid,))
    if not rows:
        raise StoreError(f"{target!r} is neither an enrolled device with unrevoked keys nor an unrevoked key id")
    kids = [r[0] for r in rows]
    for kid in kids:
        tx.execute("UPDATE keys SET state = 'revoked', revoked_at = ? WHERE kid = ?", (at, kid))
    return [key(tx, kid) for kid in kids]  # type: ignore[misc]


def key(tx: Tx, kid: bytes) -> KeyRecord | None:
    row = tx.one(f"SELECT {_KEY_COLUMNS} FROM keys k JOIN devices d ON d.device = k.device WHERE k.kid = ?", (kid,))
    return None if row is None else _record(row)


def keys(tx: Tx, kids: Iterable[bytes]) -> dict[bytes, KeyRecord]:
    """The records of those of ``kids`` that are enrolled, in one statement per 500 keys."""
    wanted = sorted(set(kids))
    found: dict[bytes, KeyRecord] = {}
    for i in range(0, len(wanted), 500):
        source, params = tx.rows(("blob",), [(kid,) for kid in wanted[i : i + 500]])
        rows = tx.all(
            f"SELECT {_KEY_COLUMNS} FROM keys k JOIN devices d ON d.device = k.device WHERE k.kid IN ({source})",
            params,
        )
        found.update((row[0], _record(row)) for row in rows)
    return found


def device_keys(tx: Tx, device: str) -> list[KeyRecord]:
    rows = tx.all(
        f"SELECT {_KEY_COLUMNS} FROM keys k JOIN devices d ON d.device = k.device WHERE k.device = ? "
        "ORDER BY k.valid_from",
        (device,),
    )
    return [_record(r) for r in rows]


def devices(tx: Tx) -> list[dict[str, object]]:
    rows = tx.all(
        "SELECT d.device, d.role, d.org, d.enrolled_at, k.kid, k.public_key, k.state, k.valid_from, k.valid_until, "
        "k.revoked_at, COALESCE(c.watermark, 0), COALESCE(c.max_seq, 0), c.last_received_at "
        "FROM devices d JOIN keys k ON k.device = d.device LEFT JOIN chains c ON c.kid = k.kid "
        "ORDER BY d.device, k.valid_from"
    )
    return [
        {
            "device": r[0],
            "role": r[1],
            "org": r[2],
            "enrolled_at": r[3],
            "kid": r[4].hex(),
            "public_key": r[5].hex(),
            "key_state": r[6],
            "valid_from": r[7],
            "valid_until": r[8],
            "revoked_at": r[9],
            "watermark": r[10],
            "max_seq": r[11],
            "last_seen": r[12],
        }
        for r in rows
    ]
