"""Ed25519 checks of a batch on a thread of their own, while the intake does the batch's Python work.

Why one helper thread and not several verifier threads: the signature arithmetic (libsodium) runs
without the interpreter lock, the rest of checking an event needs it. Measured on 2 cores, threads
that each run whole checks contend for the lock and drain slower than one thread doing everything;
one thread doing the Python work with the arithmetic beside it drains faster than both
(docs/performance.md). This thread checks a whole batch in one call that holds no lock
(server/batch_verify.py), so it takes the lock twice per batch, not once per signature.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

from battery_trace.server.batch_verify import Job, verify_all


class SignatureChecker:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[list[Job], Future[list[bool]]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="signatures", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def submit(self, jobs: list[Job]) -> Future[list[bool]]:
        """Whether each signature holds, in order, once the thread has checked them."""
        future: Future[list[bool]] = Future()
        self._jobs.put((jobs, future))
        return future

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            jobs, future = item
            try:
                future.set_result(verify_all(jobs))
            except Exception as exc:  # handed to the intake, which stops rather than guess
                future.set_exception(exc)
