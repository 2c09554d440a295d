"""A source's watchdog: when it last gave a reading, and what it received instead since.

A reader that is alive but hears nothing looks, from inside, exactly like an empty slot or an idle
port; only time tells. Each source records the moment a frame last became a reading (on the
monotonic clock: a wall-clock step must not make a source look silent or fresh) and counts, by
reason, the frames that did not (bad lines, error frames, decode errors), so that /healthz can say
"silent for 40 s, received only: not_j1939 x 312" instead of nothing.
"""

from __future__ import annotations

import time
from collections import Counter


class Silence:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.heard_at: float | None = None
        self.instead: Counter[str] = Counter()  # frames that gave no reading since the last one that did

    def heard(self) -> None:
        self.heard_at = time.monotonic()
        if self.instead:
            self.instead.clear()

    def seconds(self) -> float:
        """How long the source has given no reading (since the agent started, if it never has)."""
        return time.monotonic() - (self.heard_at if self.heard_at is not None else self.started)

    def describe(self) -> str:
        if not self.instead:
            return "nothing decoded"
        return "received only: " + ", ".join(f"{reason} x {n}" for reason, n in self.instead.most_common())
