"""Check a batch of Ed25519 signatures in one call that holds no interpreter lock while it works.

The collector checks a batch's signatures on a helper thread while its main thread does the batch's
Python work (server/signatures.py). PyNaCl releases the lock inside each verification but must take
it back between two of them, and beside a busy thread that takes up to one switch interval (5 ms):
measured, ~350 checks/s instead of ~14,000. ``server._ed25519_batch`` (C, built at install) runs
the whole loop without the lock, calling libsodium's ``crypto_sign_verify_detached`` — the function
PyNaCl's own verify ends in — from the libsodium PyNaCl loaded, so both accept the same signatures
(property-tested). Where the extension could not be built (no C compiler at install), ``verify_all``
checks one signature per call through PyNaCl: the same answers, only without the overlap.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
from collections.abc import Sequence

import nacl.bindings
from battery_trace.protocol.keys import PublicKey

log = logging.getLogger(__name__)

Job = tuple[PublicKey, bytes, bytes]  # key, signed bytes, signature

try:
    from battery_trace.server import _ed25519_batch
except ImportError:  # built with `pip install` where a C compiler is present; see the module docstring
    _ed25519_batch = None  # type: ignore[assignment]


@functools.cache
def _verify_address() -> int:
    """The address of libsodium's crypto_sign_verify_detached in the library PyNaCl loaded; 0 when it
    cannot be found (PyNaCl's private module layout is not a promise), and then checks go per call."""
    nacl.bindings.sodium_init()  # idempotent; libsodium must be initialised before its first use
    try:
        sodium = importlib.import_module("nacl._sodium")
        library = ctypes.CDLL(sodium.__file__)  # the already loaded library: same code, same state
        return ctypes.cast(library.crypto_sign_verify_detached, ctypes.c_void_p).value or 0
    except (ImportError, AttributeError, OSError) as exc:
        log.warning("checking signatures one call at a time: libsodium's verify not found (%s)", exc)
        return 0


def lock_free() -> bool:
    """Whether ``verify_all`` runs without the interpreter lock (the extension is built and libsodium's
    verify function was found)."""
    return _ed25519_batch is not None and _verify_address() != 0


def verify_all(jobs: Sequence[Job]) -> list[bool]:
    """Whether each signature holds for its key and signed bytes, in order."""
    if not lock_free():
        return [key.verify(signed, signature) for key, signed, signature in jobs]
    verdicts = _ed25519_batch.verify_all(_verify_address(), [(key.raw, signed, sig) for key, signed, sig in jobs])
    return [verdict == 1 for verdict in verdicts]
