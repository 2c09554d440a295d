"""Per-event costs of the wire contract on one core: encode, sign, verify (two libraries), decode.

DESIGN.md §9 asks to measure PyNaCl (libsodium) against `cryptography` for the verification hot path
and use what the numbers say; this prints both, measured in the same run.

    .venv/bin/python -m bench.envelope_rates [--seconds 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from battery_trace.protocol import envelope, events, keys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bench.machine import describe

CODE = "0RJPEA00HAU0AAG1C3000123"
HEALTH = {"voltage_v": 352.6, "current_a": -12.5, "soc_pct": 63, "cells_v": [3.41] * 96, "temps_c": [31] * 12}


def rate(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement (default: %(default)s)")
    args = p.parse_args()
    key = keys.generate()
    ev = events.Event(
        "station-1",
        1,
        events.ZERO_HASH,
        1_767_225_600_000,
        "health",
        "label",
        {"code": CODE, "health": HEALTH, "slot": 3},
    )
    payload = events.encode(ev)
    sealed = envelope.sign(payload, key)
    env = envelope.decode(sealed)
    to_verify = env.sig_structure()
    openssl_key = Ed25519PublicKey.from_public_bytes(key.public.raw)

    print(f"machine: {describe()}")
    print(f"event: health snapshot with 96 cells, payload {len(payload)} bytes, envelope {len(sealed)} bytes")
    results = {
        "encode event (deterministic CBOR)": rate(lambda: events.encode(ev), args.seconds),
        "sign envelope (PyNaCl)": rate(lambda: envelope.sign(payload, key), args.seconds),
        "verify signature only, PyNaCl": rate(lambda: key.public.verify(to_verify, env.signature), args.seconds),
        "verify signature only, cryptography": rate(lambda: openssl_key.verify(env.signature, to_verify), args.seconds),
        "decode + verify envelope (PyNaCl)": rate(lambda: envelope.verify(sealed, key.public), args.seconds),
        "decode event (strict)": rate(lambda: events.decode(payload), args.seconds),
    }
    for name, value in results.items():
        print(f"  {name:<40} {value:>10,.0f} /s   {1e6 / value:8.1f} µs")
    ratio = results["verify signature only, PyNaCl"] / results["verify signature only, cryptography"]
    print(f"PyNaCl verifies {ratio:.2f}x as fast as cryptography on this machine")


if __name__ == "__main__":
    main()
