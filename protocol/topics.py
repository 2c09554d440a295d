"""MQTT topics of the contract and the device ids they carry.

A device id becomes one topic level, so it must never contain MQTT's separators or wildcards; it is
also a file name, a label and a database key on the way, so it is kept to a small, unambiguous
alphabet (lower case only, so ``Station-1`` and ``station-1`` cannot become two devices).
"""

from __future__ import annotations

import re
from typing import Literal

from battery_trace.protocol.text import shown

PREFIX = "bt/v1"
Kind = Literal["events", "receipts", "status"]
KINDS: tuple[Kind, ...] = ("events", "receipts", "status")
MAX_DEVICE_ID = 64
DEVICE_ID_RULE = (
    f"1-{MAX_DEVICE_ID} characters of a-z, 0-9, '.', '_' and '-', starting and ending with a letter or digit"
)
_DEVICE_ID = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")

# What collectors subscribe to: every device's events, shared across the collector group.
SHARED_EVENTS = f"$share/collectors/{PREFIX}/+/events"


class TopicError(ValueError):
    pass


def device_id_problem(device: str) -> str | None:
    """Why ``device`` is not a valid device id, or None when it is."""
    if not device:
        return f"is empty; valid: {DEVICE_ID_RULE}"
    if len(device) > MAX_DEVICE_ID:
        return f"is {len(device)} characters; valid: {DEVICE_ID_RULE}"
    if _DEVICE_ID.fullmatch(device):
        return None
    if device.lower() != device and _DEVICE_ID.fullmatch(device.lower()):
        return f"{shown(device)} has upper case; use {shown(device.lower())}"
    bad = next((c for c in device if not re.fullmatch(r"[a-z0-9._-]", c)), None)
    if bad is not None:
        return f"{shown(device)} contains {shown(bad)}; valid: {DEVICE_ID_RULE}"
    return f"{shown(device)} must start and end with a letter or digit"


def check_device_id(device: str) -> str:
    problem = device_id_problem(device)
    if problem:
        raise TopicError(f"device id {problem}")
    return device


def topic(device: str, kind: Kind) -> str:
    if kind not in KINDS:
        raise TopicError(f"topic kind {kind!r} is not valid; valid: {', '.join(KINDS)}")
    return f"{PREFIX}/{check_device_id(device)}/{kind}"


def parse(topic_name: str) -> tuple[str, Kind]:
    """(device, kind) of a contract topic; raises TopicError for anything else."""
    parts = topic_name.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != PREFIX or parts[3] not in KINDS:
        raise TopicError(
            f"{shown(topic_name)} is not a topic of the contract ({PREFIX}/<device>/events|receipts|status)"
        )
    return check_device_id(parts[2]), parts[3]  # type: ignore[return-value]
