"""Times and numbers a person types (CLI flags, API query parameters), checked before anything uses them.

One checker for both, so ``--at`` and ``?window_s=`` refuse the same slips the same way: NaN and
infinities (``float()`` accepts ``nan``, ``inf`` and ``1e400``), values outside their range instead of
clamping them, times in milliseconds where seconds are meant (``1764600000000`` is the year 57887: a
revocation then never takes effect), and ISO 8601 times without a zone (local time or UTC? eight hours
matter for a revocation). Each message says what was given and what would be valid; the caller adds
where (``argument --at:``, ``parameter window_s``).
"""

from __future__ import annotations

import datetime as dt
import math

EARLIEST = 946_684_800.0  # 2000-01-01T00:00:00Z: nothing in a battery's record is older
LATEST = 4_102_444_800.0  # 2100-01-01T00:00:00Z: a time beyond is a slip (milliseconds, a digit too many)
TIME_FORMS = (
    "ISO 8601 with a zone (2026-11-01T08:00:00Z, 2026-11-01T16:00:00+08:00), a date (2026-11-01, UTC) or Unix seconds"
)


class InputError(ValueError):
    """A value a person gave that is not valid; the message says what was given and what is."""


def iso(seconds: float) -> str:
    """A time for a person to read; numbers beyond what a calendar shows are shown as numbers."""
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):
        return f"the year {1970 + seconds / 31_556_952:.0f}"  # e.g. milliseconds read as seconds


def number(text: str, low: float, high: float, whole: bool = False) -> float:
    """A finite number in [low, high]; ``whole`` refuses fractions."""
    kind = "whole number" if whole else "number"
    valid = f"valid: a {kind} from {low:g} to {high:g}"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{text!r} is not a number; {valid}") from None
    if not math.isfinite(value):
        raise InputError(f"{text!r} is not a finite number; {valid}")
    if whole and not value.is_integer():
        raise InputError(f"{text!r} is not a whole number; {valid}")
    if not low <= value <= high:
        raise InputError(f"{text!r} is out of range; {valid}")
    return value


def whole(text: str, low: int, high: int) -> int:
    return int(number(text, low, high, whole=True))


def time_s(text: str, earliest: float = EARLIEST, latest: float = LATEST) -> float:
    """Unix seconds from a time a person typed, between ``earliest`` and ``latest``."""
    valid = f"valid: {TIME_FORMS} from {iso(earliest)} to {iso(latest)}"
    value = _seconds(text.strip(), valid)
    if not math.isfinite(value):
        raise InputError(f"{text!r} is not a finite number of seconds; {valid}")
    if value > latest and earliest <= value / 1000 <= latest:
        raise InputError(
            f"{text!r} is {iso(value)}: it looks like milliseconds ({value / 1000:.0f} seconds is "
            f"{iso(value / 1000)}); {valid}"
        )
    if not earliest <= value <= latest:
        raise InputError(f"{text!r} is {iso(value)}; {valid}")
    return value


def _seconds(text: str, valid: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"{text!r} is not a time; {valid}") from None
    if when.tzinfo is None:
        if len(text) > 10:  # a date and a time of day, but in which zone?
            raise InputError(f"{text!r} has no zone (add Z for UTC, or +08:00); {valid}")
        when = when.replace(tzinfo=dt.UTC)  # a date alone: midnight UTC
    return when.timestamp()
