"""The contract's rule for text, and how text a device chose is shown back to people.

Every text an event carries — battery codes, VINs, names, notes, fault names — is one line of text with
no control character (Unicode category Cc: U+0000-U+001F, U+007F-U+009F) and no surrogate. The reason
is evidence on two backends: PostgreSQL's text type cannot hold U+0000 while SQLite's can, so a NUL that
reached the store would be kept by one and refused by the other; and a control character in a name is
never part of a name. Format characters such as right-to-left marks are text (scripts need them) and
are allowed; when device-supplied text appears in a reason, a detail or a log line it is shown quoted
and escaped (``shown``), so nothing a device sends can reorder, hide or forge what an operator reads.
"""

from __future__ import annotations

import re
from typing import Any

TEXT_RULE = "one line of text without control characters (U+0000-U+001F, U+007F-U+009F) or surrogates"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# What ``escaped`` writes as escapes: the controls and surrogates above, and the characters that are text
# but can reorder or hide what a person reads (bidirectional controls, zero-width and invisible
# characters, line and paragraph separators).
_HIDDEN = re.compile(
    r"[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
    r"\ud800-\udfff]"
)
# Longest device-supplied value quoted in a message; the rest is summarised by its length.
SHOWN_MAX = 80
# Integers beyond this many bits are summarised: their decimal form alone could fill a message.
_SHOWN_INT_BITS = 128


def control_problem(text: str) -> str | None:
    """What breaks the text rule in ``text`` (the first offending character and where), or None."""
    found = _CONTROL.search(text)
    if found is None:
        return None
    return f"contains {shown(found.group())} at position {found.start() + 1}; valid: {TEXT_RULE}"


def shown(value: Any, limit: int = SHOWN_MAX) -> str:
    """``value`` as it may appear in a message a person reads: quoted, every character that is not
    printable escaped (NUL as ``\\x00``, a right-to-left override as ``\\u202e``), at most ``limit``
    characters of it followed by its full length."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value)} characters)"
    if isinstance(value, bytes):
        if len(value) <= limit // 2:
            return repr(value)
        return f"{value[: limit // 2]!r}… ({len(value)} bytes)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _SHOWN_INT_BITS:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, dict | list | tuple):
        return f"a {type(value).__name__} of {len(value)} items"
    return escaped(repr(value), limit)


def escaped(text: str, limit: int | None = None) -> str:
    """``text`` with every control character, surrogate and character that could reorder or hide what a
    person reads written as its escape (``\\x00``, ``\\u202e``), so that it is valid text for every
    backend and shows as it is in every terminal; cut to ``limit`` characters (marked) when given."""
    if _HIDDEN.search(text):
        text = _HIDDEN.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)
    if limit is not None and len(text) > limit:
        return f"{text[: limit - 1]}…"
    return text
