"""The registry: devices, their role, and their keys' lifecycle (active, retired by rotation, revoked).

A device has one role for life; a new role is a new device. Rotating gives a device a new active key
and retires the old one from that moment: events the old key sealed before the rotation are still
accepted when they arrive later (a station may have been offline), later ones are not. Revoking is
for a key that can no longer be trusted: nothing it signs is accepted from the revocation time on,
and when that time lies in the past, what was already stored since then is flagged.

A wrong revocation can be corrected. Moving it earlier is always allowed (it only trusts less).
Moving it later means lifting it first (``unrevoke``), and a revocation already in effect (messages
may have been refused under it, stored events flagged) is lifted only when the operator says so
explicitly, and is told what it had done: an effective revocation is never undone silently.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from battery_trace.protocol.keys import PublicKey
from battery_trace.server.inputs import iso
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
    # Every earlier key ends now, including one whose revocation is scheduled but not yet in effect:
    # lifting that revocation later must leave a retired key, not a second active one.
    tx.execute("UPDATE keys SET valid_until = ? WHERE device = ? AND valid_until IS NULL", (at, device))
    tx.execute("UPDATE keys SET state = 'retired' WHERE device = ? AND state = 'active'", (device,))
    tx.execute(
        "INSERT INTO keys (kid, device, public_key, state, valid_from) VALUES (?, ?, ?, 'active', ?)",
        (public.kid, device, public.raw, at),
    )
    return key(tx, public.kid)  # type: ignore[return-value]


@dataclass(frozen=True)
class Revocation:
    key: KeyRecord  # as it is now
    previous: float | None  # the revocation time this one replaced (None: the key was not revoked)


def _targets(tx: Tx, target: str) -> list[KeyRecord]:
    """The keys of a device, or the one key a key id (hex) names, locked for the change."""
    for column, value in (("device", target), ("kid", _kid(target))):
        rows = tx.all(
            f"SELECT {_KEY_COLUMNS} FROM keys k JOIN devices d ON d.device = k.device WHERE k.{column} = ? "
            f"ORDER BY k.valid_from{tx.dialect.for_update}",
            (value,),
        )
        if rows:
            return [_record(r) for r in rows]
    raise StoreError(f"{target!r} is neither an enrolled device nor an enrolled key id")


def _kid(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


def revoke(tx: Tx, target: str, at: float) -> list[Revocation]:
    """Revoke a device's keys (``target`` is a device id) or one key (a key id in hex) from ``at`` on;
    a key already revoked later than ``at`` has its revocation moved earlier."""
    changed = []
    for k in _targets(tx, target):
        if k.revoked_at is None or at < k.revoked_at:
            tx.execute("UPDATE keys SET state = 'revoked', revoked_at = ? WHERE kid = ?", (at, k.kid))
            changed.append(Revocation(key(tx, k.kid), k.revoked_at))  # type: ignore[arg-type]
    if not changed:
        since = min(k.revoked_at for k in _targets(tx, target))  # type: ignore[type-var]
        raise StoreError(
            f"{target} is already revoked from {iso(since)}, which is not later than {iso(at)}; to move a "
            f"revocation later, lift it first: battery-server devices unrevoke {target}"
        )
    return changed


@dataclass(frozen=True)
class Lifted:
    key: KeyRecord  # as it is now
    revoked_at: float  # the revocation that was lifted
    refused: int  # messages quarantined under it (key_revoked)
    flagged: int  # stored events flagged because of it (revoked_key findings, left open for review)


def unrevoke(tx: Tx, target: str, now: float, in_effect: bool) -> list[Lifted]:
    """Lift the revocation of a device's keys or of one key. One already in effect at ``now`` is lifted
    only with ``in_effect``; without it nothing changes and the error says what the revocation did."""
    revoked = [k for k in _targets(tx, target) if k.revoked_at is not None]
    if not revoked:
        raise StoreError(f"{target} is not revoked; nothing to lift")
    lifted = [Lifted(k, k.revoked_at, *_effects(tx, k)) for k in revoked]  # type: ignore[arg-type]
    effective = [x for x in lifted if x.revoked_at <= now]
    if effective and not in_effect:
        raise StoreError(
            "; ".join(
                f"key {x.key.kid.hex()} of {x.key.device} is revoked since {iso(x.revoked_at)}, in "
                f"effect: {x.refused} message(s) refused under it, {x.flagged} stored event(s) flagged"
                for x in effective
            )
            + "; lifting it lets that key's signatures in again: add --in-effect to lift it anyway"
        )
    for x in lifted:
        state = "active" if x.key.valid_until is None else "retired"
        tx.execute("UPDATE keys SET state = ?, revoked_at = NULL WHERE kid = ?", (state, x.key.kid))
    return [Lifted(key(tx, x.key.kid), x.revoked_at, x.refused, x.flagged) for x in lifted]  # type: ignore[arg-type]


def _effects(tx: Tx, k: KeyRecord) -> tuple[int, int]:
    """What a revocation has done so far: messages refused under it, stored events flagged by it."""
    # The quarantine keeps no key id column; the verifier's detail for key_revoked starts with it.
    refused = tx.value(
        "SELECT COUNT(*) FROM quarantine WHERE reason = 'key_revoked' AND received_at >= ? AND detail LIKE ?",
        (k.revoked_at, f"key {k.kid.hex()} %"),
    )
    flagged = tx.value(
        "SELECT COUNT(*) FROM findings WHERE kind = 'revoked_key' AND ref_kid = ? AND resolved_at IS NULL", (k.kid,)
    )
    return int(refused), int(flagged)


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
