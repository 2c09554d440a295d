"""Ed25519 keys: generate, store, load, export, and the key id that names a key on the wire.

Signing and verification go through libsodium (PyNaCl): its verification is strict (canonical S,
no small-order keys or R) and measured here at about twice the rate of `cryptography` on one core.
`cryptography` is used only for the standard file formats (PKCS#8 and SubjectPublicKeyInfo PEM).
"""

from __future__ import annotations

import hashlib
import os
import string
from dataclasses import dataclass, field
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from battery_trace.bounded_read import UnreadableInput, read_bounded

KEY_ID_LENGTH = 16
MAX_KEY_FILE = 16 * 1024


class InvalidKey(ValueError):
    """A key that cannot be used: unreadable, malformed, not Ed25519, or unsafe."""


def key_id(public_raw: bytes) -> bytes:
    """The first 16 bytes of SHA-256 of the raw public key: stable, and short enough for a header."""
    return hashlib.sha256(public_raw).digest()[:KEY_ID_LENGTH]


@dataclass(frozen=True)
class PublicKey:
    raw: bytes
    _verifier: nacl.signing.VerifyKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise InvalidKey(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")
        if not nacl.bindings.crypto_core_ed25519_is_valid_point(self.raw):
            # Small-order or non-canonical points would let anyone forge signatures that "verify".
            raise InvalidKey("not a sound Ed25519 public key (not on the curve, small order, or non-canonical)")
        object.__setattr__(self, "_verifier", nacl.signing.VerifyKey(self.raw))  # built once, used per event

    @property
    def kid(self) -> bytes:
        return key_id(self.raw)

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def pem(self) -> str:
        key = ed25519.Ed25519PublicKey.from_public_bytes(self.raw)
        return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            self._verifier.verify(message, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True


class PrivateKey:
    """A signing key. Its repr names only the key id, so secret material never reaches a log."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise InvalidKey(f"an Ed25519 private key is 32 bytes, got {len(seed)}")
        self.seed = seed
        self._signing = nacl.signing.SigningKey(seed)
        self.public = PublicKey(bytes(self._signing.verify_key))

    def __repr__(self) -> str:
        return f"PrivateKey(kid={self.public.kid.hex()})"

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def pem(self) -> bytes:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(self.seed)
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def generate() -> PrivateKey:
    """A new key from the operating system's random number generator."""
    return PrivateKey(os.urandom(32))


def save_private(key: PrivateKey, path: Path) -> None:
    """Write PKCS#8 PEM with mode 0600; refuse to overwrite an existing file (it may be a live identity)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise InvalidKey(f"{path} already exists; refusing to overwrite a key (move it away first)") from None
    try:
        os.fchmod(fd, 0o600)  # the umask may not be trusted to leave 0600 alone
        os.write(fd, key.pem())
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_KEY_FILE)
    except UnreadableInput as exc:
        raise InvalidKey(f"key file: {exc}") from None


def load_private(path: Path) -> PrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidKey(f"{path} is not an unencrypted PKCS#8 PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InvalidKey(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return PrivateKey(key.private_bytes_raw())


def parse_public(text: str) -> PublicKey:
    """A public key given as 64 hex characters or as SubjectPublicKeyInfo PEM text."""
    text = text.strip()
    if "-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text.encode())
        except (ValueError, TypeError) as exc:
            raise InvalidKey(f"not a PEM public key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise InvalidKey(f"PEM holds a {type(key).__name__}, not an Ed25519 key")
        return PublicKey(key.public_bytes_raw())
    if len(text) != 64 or any(c not in string.hexdigits for c in text):
        raise InvalidKey(f"expected 64 hex characters (a raw Ed25519 public key) or PEM, got {len(text)} characters")
    return PublicKey(bytes.fromhex(text))


def load_public(spec: str, base_dir: Path | None = None) -> PublicKey:
    """A public key from a command line or config value: hex text, or the path of a PEM file.

    A relative path is taken from ``base_dir`` (a config file's folder) when given.
    """
    candidate = spec.strip()
    if len(candidate) == 64 and all(c in string.hexdigits for c in candidate):
        return parse_public(candidate)
    path = Path(spec).expanduser()
    if base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise InvalidKey(f"{spec!r} is neither 64 hex characters nor an existing PEM file")
    try:
        text = _read(path).decode("ascii")
    except UnicodeDecodeError:
        raise InvalidKey(f"{path} is not a PEM text file") from None
    return parse_public(text)
