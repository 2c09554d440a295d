"""Waiting for something a real process does, for tests, benchmarks and the fault suite alike."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    procs: Iterable[subprocess.Popen[bytes]] = (),
    every: float = 0.1,
) -> float:
    """Poll ``condition`` until it holds and return how many seconds that took; fail naming ``what``,
    or a process of ``procs`` that died meanwhile (its failure, not the timeout, is the news)."""
    procs = list(procs)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args} exited with {p.returncode} while waiting for {what}")
        if condition():
            return time.monotonic() - start
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
