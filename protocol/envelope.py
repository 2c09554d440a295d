"""Signed envelopes: tagged COSE_Sign1 (RFC 9052) with EdDSA over Ed25519.

Our envelopes carry ``alg`` and ``kid`` in the protected header and the deterministic CBOR of an event
(or receipt) as payload. Verification works on the bytes as received: the protected header and the
payload are used exactly as they arrived, never re-serialised, so an envelope made by any RFC 9052
implementation verifies here (``kid`` may be in either header, the payload may be anything), and the
bytes we store are the bytes that were signed.

An envelope's identity is its bytes (its hash is what the next event's ``prev`` links to and what the
record keys on), yet the outer array is not signed: re-encoding it, or adding an unprotected header,
would keep the signature valid and change the hash. So only the canonical outer form is accepted:
the whole envelope in deterministic CBOR (shortest heads, definite lengths, tag 18 and no other tag),
and an unprotected header that is empty, or holds only the key id when the protected header has none
(the key id is bound to the key the signature is checked with). One signed content, one byte string.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

from battery_trace.protocol import cbor
from battery_trace.protocol.keys import PrivateKey, PublicKey
from battery_trace.protocol.text import shown

COSE_SIGN1_TAG = 18
HEADER_ALG = 1
HEADER_CRIT = 2
HEADER_CONTENT_TYPE = 3
HEADER_KID = 4
ALG_EDDSA = -8  # RFC 9053
ALG_ED25519 = -19  # RFC 9864, the fully specified name for the same algorithm
ACCEPTED_ALGS = {ALG_EDDSA: "EdDSA", ALG_ED25519: "Ed25519"}
UNDERSTOOD_HEADERS = frozenset({HEADER_ALG, HEADER_CRIT, HEADER_CONTENT_TYPE, HEADER_KID})
MAX_ENVELOPE = 64 * 1024
HASH_LENGTH = 32


class EnvelopeError(ValueError):
    """Why an envelope was refused. ``reason`` is a stable short name (counted, shown, queried)."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Envelope:
    raw: bytes
    protected_raw: bytes
    protected: dict[Any, Any]
    unprotected: dict[Any, Any]
    payload: bytes
    signature: bytes

    @property
    def alg(self) -> Any:
        return self.protected.get(HEADER_ALG)

    @property
    def kid(self) -> bytes | None:
        kid = self.protected.get(HEADER_KID, self.unprotected.get(HEADER_KID))
        return kid if isinstance(kid, bytes) else None

    @functools.cached_property
    def hash(self) -> bytes:  # asked for several times per event on the server's hot path
        return envelope_hash(self.raw)

    def sig_structure(self) -> bytes:
        return _sig_structure(self.protected_raw, self.payload)


def envelope_hash(raw: bytes) -> bytes:
    """SHA-256 of the whole envelope as sent: what the next event's ``prev`` links to."""
    return hashlib.sha256(raw).digest()


_SIG1_PREFIX = cbor.encode(["Signature1", b"", b"", b""])[:12]  # array(4), "Signature1"
_EMPTY_BSTR = cbor.encode(b"")


def _sig_structure(protected_raw: bytes, payload: bytes) -> bytes:
    # RFC 9052 §4.4: ["Signature1", body_protected, external_aad, payload], external_aad empty. Built from
    # its parts: the same bytes cbor.encode gives for that array, without walking it on every event.
    return b"".join(
        (
            _SIG1_PREFIX,
            cbor.byte_string_head(len(protected_raw)),
            protected_raw,
            _EMPTY_BSTR,
            cbor.byte_string_head(len(payload)),
            payload,
        )
    )


def sign(payload: bytes, key: PrivateKey) -> bytes:
    """A tagged COSE_Sign1 over ``payload`` with alg EdDSA and the key id in the protected header."""
    protected_raw = cbor.encode({HEADER_ALG: ALG_EDDSA, HEADER_KID: key.public.kid})
    signature = key.sign(_sig_structure(protected_raw, payload))
    return cbor.encode(cbor.Tag(COSE_SIGN1_TAG, [protected_raw, {}, payload, signature]))


def _header_map(value: Any, where: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise EnvelopeError("malformed", f"{where} header must be a map, got {type(value).__name__}")
    return value


@functools.lru_cache(maxsize=4096)
def _decode_protected(protected_raw: bytes) -> tuple[tuple[Any, Any], ...]:
    # Every envelope of a key carries the same protected header: decode each distinct one once.
    try:
        protected = cbor.decode(protected_raw)
    except cbor.CborError as exc:
        raise EnvelopeError("malformed", f"protected header: {exc}") from None
    return tuple(_header_map(protected, "protected").items())


def _protected_header(protected_raw: bytes) -> dict[Any, Any]:
    if not protected_raw:
        return {}
    if len(protected_raw) > 256:  # never let large, attacker-chosen headers fill the cache
        return dict(_decode_protected.__wrapped__(protected_raw))
    return dict(_decode_protected(protected_raw))


def _usual_shape(data: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(protected, payload, signature) when ``data`` is exactly tag 18, an array of four, a byte
    string, an empty map and two byte strings, each head in its shortest form: what every agent (and
    most COSE libraries) sends. None for anything else, which the general decoder then reads and, if it
    must, explains. Read straight from the bytes because this runs for every message a collector
    receives (about half the cost of decoding the envelope through the general decoder)."""
    if not data.startswith(b"\xd2\x84"):
        return None
    size = len(data)
    parts = []
    pos = 2
    for index in range(3):
        if index == 1:  # between the protected header and the payload: the empty unprotected map
            if data[pos : pos + 1] != b"\xa0":
                return None
            pos += 1
        if pos >= size or data[pos] >> 5 != 2:
            return None
        info = data[pos] & 0x1F
        if info < 24:
            length, pos = info, pos + 1
        elif info <= 27:
            start, pos = pos + 1, pos + 1 + (1 << (info - 24))
            if pos > size:
                return None
            length = int.from_bytes(data[start:pos], "big")
            if length < (24 if info == 24 else 1 << (8 << (info - 25))):
                return None  # not the shortest head: the canonical form is the only one accepted
        else:
            return None  # an indefinite length or a reserved value
        if length > size - pos:
            return None
        parts.append(data[pos : pos + length])
        pos += length
    if pos != size:
        return None
    protected_raw, payload, signature = parts
    return protected_raw, payload, signature


def _general_shape(data: bytes, canonical: bool = True) -> tuple[bytes, dict[Any, Any], Any, Any]:
    """(protected, unprotected, payload, signature) of any COSE_Sign1 the contract's CBOR can carry."""
    try:
        item = cbor.decode(data, deterministic=canonical, tags=frozenset({COSE_SIGN1_TAG}))
    except cbor.CborError as exc:
        raise EnvelopeError("malformed", f"not CBOR the contract accepts: {exc}") from None
    if not isinstance(item, cbor.Tag):
        raise EnvelopeError("malformed", "expected a tagged COSE_Sign1 (CBOR tag 18), found no tag")
    body = item.value
    if not isinstance(body, list) or len(body) != 4:
        raise EnvelopeError("malformed", "COSE_Sign1 must be an array of 4 items")
    protected_raw, unprotected, payload, signature = body
    if not isinstance(protected_raw, bytes):
        raise EnvelopeError("malformed", "protected header must be a byte string")
    return protected_raw, _header_map(unprotected, "unprotected"), payload, signature


def decode(data: bytes, *, max_size: int = MAX_ENVELOPE, canonical: bool = True) -> Envelope:
    """Parse an envelope without verifying it.

    ``canonical``: only the canonical outer form (what receivers accept). Bytes already in a record
    were accepted under the rules of their day, and a record must stay readable: those are read with
    ``canonical=False`` (any COSE_Sign1 the contract's CBOR can carry, headers as they came).
    Raises EnvelopeError with reason ``too_large`` or ``malformed``.
    """
    if len(data) > max_size:
        raise EnvelopeError("too_large", f"envelope is {len(data)} bytes, the limit is {max_size}")
    usual = _usual_shape(data)
    if usual is not None:
        (protected_raw, payload, signature), unprotected = usual, {}
    else:
        protected_raw, unprotected, payload, signature = _general_shape(data, canonical)
    protected = _protected_header(protected_raw)
    if payload is None:
        raise EnvelopeError("malformed", "detached payloads are not supported: the payload must be in the envelope")
    if not isinstance(payload, bytes):
        raise EnvelopeError("malformed", "payload must be a byte string")
    if not isinstance(signature, bytes):
        raise EnvelopeError("malformed", "signature must be a byte string")
    both = set(protected) & set(unprotected)
    if both:
        raise EnvelopeError("malformed", f"header labels {sorted(map(str, both))} appear in both buckets")
    # (An alg there is left to check_headers, which refuses it with the more useful reason.)
    extra = set(unprotected) - {HEADER_ALG}
    if canonical and extra and (extra != {HEADER_KID} or HEADER_KID in protected):
        labels = sorted(map(str, extra))
        raise EnvelopeError(
            "malformed",
            f"unprotected header labels {labels}: the unprotected header is not signed, so it may hold only "
            "the key id (4), and only when the protected header has none",
        )
    return Envelope(bytes(data), protected_raw, protected, unprotected, payload, signature)


def verify(envelope: Envelope | bytes, key: PublicKey, *, max_size: int = MAX_ENVELOPE) -> Envelope:
    """Check an envelope's algorithm, critical headers and signature against ``key``.

    The key id is not compared here: callers find the key by id and decide what a mismatch means.
    Raises EnvelopeError with reason ``too_large``, ``malformed``, ``unsupported_algorithm`` or
    ``bad_signature``.
    """
    env = envelope if isinstance(envelope, Envelope) else decode(envelope, max_size=max_size)
    check_headers(env)
    if not key.verify(env.sig_structure(), env.signature):
        raise EnvelopeError("bad_signature", BAD_SIGNATURE)
    return env


BAD_SIGNATURE = "signature does not verify with this key"


def check_headers(env: Envelope) -> None:
    """Everything ``verify`` checks except the signature itself (alg, critical headers), so a server
    can run the signature checks of a batch elsewhere. Raises EnvelopeError like ``verify``."""
    if HEADER_ALG not in env.protected:
        where = "only in the unprotected header" if HEADER_ALG in env.unprotected else "missing"
        raise EnvelopeError("unsupported_algorithm", f"alg is {where}; it must be in the protected header")
    if env.alg not in ACCEPTED_ALGS:
        raise EnvelopeError(
            "unsupported_algorithm", f"alg {shown(env.alg)} is not accepted; valid: -8 (EdDSA) or -19 (Ed25519)"
        )
    crit = env.protected.get(HEADER_CRIT)
    if crit is not None:
        if not isinstance(crit, list) or not crit:
            raise EnvelopeError("malformed", "crit must be a non-empty array of header labels")
        unknown = [label for label in crit if label not in UNDERSTOOD_HEADERS or label not in env.protected]
        if unknown:
            raise EnvelopeError("malformed", f"critical header labels {unknown} are not understood or not present")


def describe(env: Envelope) -> dict[str, Any]:
    """A JSON-friendly view of the envelope's structure (for ``inspect`` and error reports)."""

    def header(h: dict[Any, Any]) -> dict[str, Any]:
        return {str(k): jsonable(v) for k, v in h.items()}

    return {
        "alg": ACCEPTED_ALGS.get(env.alg, env.alg) if isinstance(env.alg, int) else jsonable(env.alg),
        "kid": env.kid.hex() if env.kid else None,
        "protected": header(env.protected),
        "unprotected": header(env.unprotected),
        "payload_size": len(env.payload),
        "signature": env.signature.hex(),
        "hash": env.hash.hex(),
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, cbor.Tag):
        return {"tag": value.tag, "value": jsonable(value.value)}
    return value
