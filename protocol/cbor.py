"""CBOR for the wire contract: deterministic encoding (RFC 8949 §4.2.1) and a strict decoder.

Both directions are our own on purpose. Encoding: cbor2's "canonical" mode sorts map keys
length-first (RFC 7049), which is not the bytewise order of RFC 8949 §4.2.1 (they differ for keys
such as -1 and 24), so a small encoder here guarantees the core deterministic form: shortest
integers, lengths and floats, definite lengths, keys in bytewise order of their encoding.

Decoding: it is the first thing that touches bytes from the network, so it
accepts only the subset the contract uses (integers, byte and text strings, arrays, maps with
integer or text keys, booleans, null, floats, and the tags a caller allows), checks every length
against the bytes actually present before allocating, limits nesting, refuses duplicate map keys
(which other decoders resolve silently, and differently), and refuses trailing bytes. With
``deterministic=True`` it also refuses any encoding other than the deterministic one, so one event
has exactly one byte string and two parties cannot disagree about what was signed.

Speed: the strict decoder is pure Python, too slow for the server's hot path. ``decode`` therefore
first lets cbor2's C decoder parse (with duplicates and indefinite lengths refused), then walks the
result to check that it uses only the contract's subset, and in deterministic mode re-encodes it
with cbor2's canonical encoder and compares bytes. cbor2's canonical order is length-first, which is
the same as RFC 8949's bytewise order when every map key is text (as in every event and receipt), so
that path is taken only then. Faster still, in deterministic mode: ``protocol._cbor_check`` (C, built
at install) checks the bytes themselves for the deterministic form and the subset, and cbor2 only
decodes (a payload: ~4 µs instead of ~19). Whenever a fast path is not sure, the strict decoder
decides, and it is the one that explains what is wrong. All are property-tested to agree.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from typing import Any

import cbor2
from battery_trace.protocol.text import shown

try:
    from battery_trace.protocol import _cbor_check
except ImportError:  # built at install where a C compiler is present; the cbor2 re-encoding serves otherwise
    _cbor_check = None  # type: ignore[assignment]

MAX_DEPTH = 16


class CborError(ValueError):
    """Input that is not acceptable CBOR; ``offset`` is the byte where the problem was found."""

    def __init__(self, offset: int, message: str) -> None:
        self.offset = offset
        super().__init__(f"CBOR byte {offset}: {message}")


@dataclass(frozen=True)
class Tag:
    tag: int
    value: Any


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError(f"{n} does not fit in 64 bits (bignums are outside the contract)")


def byte_string_head(length: int) -> bytes:
    """The head of a byte string of ``length`` bytes (major type 2, shortest form)."""
    return _head(2, length)


def _float(value: float) -> bytes:
    if not math.isfinite(value):
        raise ValueError(f"{value} is not a finite number")
    for fmt, info in ((">e", 25), (">f", 26)):
        try:
            packed = struct.pack(fmt, value)
        except (OverflowError, struct.error):
            continue
        if struct.unpack(fmt, packed)[0] == value:
            return bytes([0xE0 | info]) + packed
    return b"\xfb" + struct.pack(">d", value)


def _encode(obj: Any, out: bytearray, path: str) -> None:
    if obj is None:
        out += b"\xf6"
    elif obj is True:
        out += b"\xf5"
    elif obj is False:
        out += b"\xf4"
    elif isinstance(obj, int):
        out += _head(0, obj) if obj >= 0 else _head(1, -1 - obj)
    elif isinstance(obj, float):
        out += _float(obj)
    elif isinstance(obj, str):
        raw = obj.encode("utf-8")
        out += _head(3, len(raw)) + raw
    elif isinstance(obj, bytes | bytearray):
        out += _head(2, len(obj)) + bytes(obj)
    elif isinstance(obj, list | tuple):
        out += _head(4, len(obj))
        for i, item in enumerate(obj):
            _encode(item, out, f"{path}[{i}]")
    elif isinstance(obj, dict):
        pairs = []
        for key, value in obj.items():
            if not isinstance(key, int | str) or isinstance(key, bool):
                raise ValueError(f"{path}: map key {shown(key)} must be an integer or text")
            encoded_key = bytearray()
            _encode(key, encoded_key, path)
            encoded_value = bytearray()
            _encode(value, encoded_value, f"{path}.{key}")
            pairs.append((bytes(encoded_key), encoded_value))
        pairs.sort(key=lambda pair: pair[0])  # RFC 8949 §4.2.1: bytewise order of the encoded keys
        out += _head(5, len(pairs))
        for encoded_key, encoded_value in pairs:
            out += encoded_key + encoded_value
    elif isinstance(obj, Tag):
        out += _head(6, obj.tag)
        _encode(obj.value, out, f"{path}<tag {obj.tag}>")
    else:
        raise ValueError(f"{path}: {type(obj).__name__} cannot be carried in the contract's CBOR")


def encode(obj: Any) -> bytes:
    """Deterministic CBOR of ``obj``; raises ValueError for values outside the contract's subset."""
    out = bytearray()
    _encode(obj, out, "$")
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes, deterministic: bool, tags: frozenset[int], max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.deterministic = deterministic
        self.tags = tags
        self.max_depth = max_depth

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise CborError(self.pos, f"needs {n} more bytes, only {len(self.data) - self.pos} left (truncated?)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def argument(self, start: int, info: int) -> int:
        if info < 24:
            return info
        if info > 27:
            if info == 31:
                raise CborError(start, "indefinite-length items are not allowed")
            raise CborError(start, f"reserved additional information {info}")
        value = int.from_bytes(self.take(1 << (info - 24)), "big")
        if self.deterministic and _head(0, value)[1:] != self.data[start + 1 : self.pos]:
            raise CborError(start, "integer or length not in its shortest form")
        return value

    def item(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise CborError(self.pos, f"nested deeper than {self.max_depth} levels")
        start = self.pos
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            return self.simple(start, info)
        arg = self.argument(start, info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self.take(arg)
        if major == 3:
            raw = self.take(arg)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CborError(start, f"text string is not valid UTF-8 ({exc.reason})") from None
        if major == 4:
            # Each item takes at least one byte: refuse counts the data cannot hold before looping.
            if arg > len(self.data) - self.pos:
                raise CborError(start, f"array of {arg} items is longer than the data")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            return self.map(start, arg, depth)
        if arg not in self.tags:
            raise CborError(start, f"tag {arg} is not allowed here")
        return Tag(arg, self.item(depth + 1))

    def map(self, start: int, count: int, depth: int) -> dict[Any, Any]:
        if 2 * count > len(self.data) - self.pos:
            raise CborError(start, f"map of {count} pairs is longer than the data")
        result: dict[Any, Any] = {}
        previous_key_bytes = b""
        for _ in range(count):
            key_start = self.pos
            key = self.item(depth + 1)
            key_bytes = self.data[key_start : self.pos]
            if not isinstance(key, int | str) or isinstance(key, bool):
                raise CborError(key_start, "map keys must be integers or text")
            if key in result:
                raise CborError(key_start, f"duplicate map key {shown(key)}")
            if self.deterministic and key_bytes <= previous_key_bytes:
                raise CborError(key_start, "map keys not in deterministic (bytewise) order")
            previous_key_bytes = key_bytes
            result[key] = self.item(depth + 1)
        return result

    def simple(self, start: int, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info in (25, 26, 27):
            fmt = {25: ">e", 26: ">f", 27: ">d"}[info]
            raw = self.take(struct.calcsize(fmt))
            (value,) = struct.unpack(fmt, raw)
            if not math.isfinite(value):
                raise CborError(start, "NaN and infinity are not allowed")
            if self.deterministic and _float(value) != self.data[start : self.pos]:
                raise CborError(start, "float not in its shortest exact form")
            return value
        if info == 31:
            raise CborError(start, "unexpected 'break' (indefinite-length items are not allowed)")
        raise CborError(start, f"simple value {info} is not allowed (only false, true, null and floats)")


_NUMBER_TYPES = frozenset({int, float})


class _NotSure(Exception):
    """The fast path cannot vouch for this input; the strict decoder decides."""


def _plain(value: Any, tags: frozenset[int], depth: int, limit: int, text_keys: bool) -> Any:
    """cbor2's result as the strict decoder would return it; _NotSure if it might not. The lists and
    maps are cbor2's fresh objects, so they are checked in place, not copied."""
    if depth > limit:
        raise _NotSure
    t = type(value)
    if t is int or t is str or t is bytes or t is bool or value is None:
        return value
    if t is float:
        if not math.isfinite(value):
            raise _NotSure
        return value
    if t is list:
        if set(map(type, value)) <= _NUMBER_TYPES:  # the common case: lists of readings
            if (value and depth >= limit) or not all(map(math.isfinite, value)):
                raise _NotSure
            return value
        for i, item in enumerate(value):
            plain = _plain(item, tags, depth + 1, limit, text_keys)
            if plain is not item:
                value[i] = plain
        return value
    if t is dict:
        for k, v in value.items():
            kt = type(k)
            if not (kt is str or (kt is int and not text_keys)):
                raise _NotSure
            vt = type(v)  # scalars inline: most values of an event are, and a call each adds up
            if vt is str or vt is int or vt is bytes or vt is bool or (vt is float and math.isfinite(v)):
                if depth >= limit:
                    raise _NotSure
                continue
            plain = _plain(v, tags, depth + 1, limit, text_keys)
            if plain is not v:
                value[k] = plain  # replacing a value while iterating is safe: the keys do not change
        return value
    if t is tuple or t is cbor2.frozendict:  # immutable containers: copied into the mutable kind
        mutable = list(value) if t is tuple else dict(value)
        return _plain(mutable, tags, depth, limit, text_keys)
    if t is cbor2.CBORTag and value.tag in tags:
        return Tag(value.tag, _plain(value.value, tags, depth + 1, limit, text_keys))
    raise _NotSure  # other tags, semantic objects (datetimes, bignums as tags...), undefined, simple values


def _refuse(decoder: Any) -> Any:
    raise _NotSure


# Tags cbor2 turns into plain values: a bignum (2, 3) into an int, a self-described (55799), shared (28,
# 29) or string-referenced (25, 256) item into the item itself. The strict decoder refuses every tag
# outside the ones it is given, so without these the fast path would accept, as a plain value, what the
# strict one refuses. cbor2 turns every other tag into a tag or a typed object, which _plain declines;
# tests/test_cbor.py compares the two decoders on every tag number up to 300 and the known ones above it.
_PLAIN_VALUE_TAGS = dict.fromkeys((2, 3, 25, 28, 29, 256, 55799), _refuse)


def _strict(max_depth: int) -> dict[str, Any]:
    """cbor2's settings for the fast path: what the strict decoder refuses, cbor2 refuses or declines."""
    return {
        "allow_duplicate_keys": False,
        "allow_indefinite": False,
        "max_depth": max_depth + 2,
        "semantic_decoders": _PLAIN_VALUE_TAGS,
    }


def _fast(data: bytes, deterministic: bool, tags: frozenset[int], max_depth: int) -> Any:
    if deterministic and _cbor_check is not None:
        # The C check vouches for the form and the subset, so cbor2's result is the strict decoder's.
        if not _cbor_check.deterministic(data, max_depth):
            raise _NotSure
        try:
            return cbor2.loads(data, semantic_decoders=_PLAIN_VALUE_TAGS)
        except Exception as exc:  # invalid UTF-8 in a text string: the strict decoder explains
            raise _NotSure from exc
    try:
        if deterministic:
            value = cbor2.loads(data, **_strict(max_depth))
            # Re-encoded before _plain replaces anything; trailing bytes, too, make the bytes differ.
            whole = cbor2.dumps(value, canonical=True) == data
        else:
            fp = io.BytesIO(data)
            value = cbor2.CBORDecoder(fp, **_strict(max_depth)).decode()
            whole = fp.tell() == len(data)
    except Exception as exc:  # any complaint at all: the strict decoder decides and explains
        raise _NotSure from exc
    if not whole:
        raise _NotSure
    return _plain(value, tags, 0, max_depth, text_keys=deterministic)


def decode(
    data: bytes,
    *,
    deterministic: bool = False,
    tags: frozenset[int] = frozenset(),
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Decode exactly one CBOR item that fills ``data``; raise CborError otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("CBOR input must be bytes")
    try:
        return _fast(bytes(data), deterministic, tags, max_depth)
    except _NotSure:
        return decode_strict(data, deterministic=deterministic, tags=tags, max_depth=max_depth)


def decode_strict(
    data: bytes,
    *,
    deterministic: bool = False,
    tags: frozenset[int] = frozenset(),
    max_depth: int = MAX_DEPTH,
) -> Any:
    """The reference decoder: slow, exact, and the one whose errors say what is wrong."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("CBOR input must be bytes")
    reader = _Reader(bytes(data), deterministic, tags, max_depth)
    if not reader.data:
        raise CborError(0, "empty input")
    value = reader.item(0)
    if reader.pos != len(reader.data):
        raise CborError(reader.pos, f"{len(reader.data) - reader.pos} trailing bytes after the item")
    return value
