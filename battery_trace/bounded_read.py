"""Reading a file (or stdin) that a person or a device supplied, never more than a limit.

Key files, configs and envelopes all come from outside; reading them whole would let one huge or
endless input (a device node, a wrong path) exhaust memory. Callers turn the one error this raises
into their own, naming what the file was supposed to be.
"""

from __future__ import annotations

import sys
from pathlib import Path


class UnreadableInput(ValueError):
    pass


def read_bounded(source: str | Path, limit: int) -> bytes:
    """The bytes of ``source`` ('-' is stdin); UnreadableInput when it cannot be read or exceeds ``limit``."""
    try:
        if str(source) == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(source, "rb") as f:
                data = f.read(limit + 1)
    except OSError as exc:
        raise UnreadableInput(f"cannot read {source}: {exc.strerror}") from None
    if len(data) > limit:
        raise UnreadableInput(f"{source} is larger than {limit} bytes")
    return data
