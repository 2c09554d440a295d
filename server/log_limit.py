"""Repeated log lines, rate-limited: a fault that repeats (an accept loop out of descriptors, a broker
that refuses every reconnect) must be told, not written a million times.

Measured before this existed: asyncio logged ``socket.accept() out of system resource`` 923,633 times
in 50 s (a 411 MB log) while 300 connections held the descriptors. Lines are grouped by logger, level
and message template (not the formatted text, whose arguments change): the first ``burst`` of a group
in each ``window_s`` pass, the rest are counted, and the next line of the group that passes says how
many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

BURST = 10
WINDOW_S = 60.0
MAX_GROUPS = 1000  # a bound on what is remembered, should templates themselves vary


class RepeatLimit(logging.Filter):
    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self.groups: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, passed, suppressed]
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self.lock:
            group = self.groups.get(key)
            if group is None or now - group[0] >= self.window_s:
                suppressed = int(group[2]) if group else 0
                if group is None and len(self.groups) >= MAX_GROUPS:
                    self.groups.clear()
                self.groups[key] = group = [now, 0, 0]
                if suppressed:
                    record.msg = f"{record.msg} [{suppressed} more like this in the {self.window_s:g} s before]"
            if group[1] >= self.burst:
                group[2] += 1
                return False
            group[1] += 1
            if group[1] == self.burst:
                record.msg = f"{record.msg} [repeated {self.burst} times; more are counted, not written]"
            return True


def install(burst: int = BURST, window_s: float = WINDOW_S) -> None:
    """Rate-limit every handler of the root logger (those ``logging.basicConfig`` made)."""
    limit = RepeatLimit(burst, window_s)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatLimit) for f in handler.filters):
            handler.addFilter(limit)
