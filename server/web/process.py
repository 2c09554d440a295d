"""The dashboard in a process of its own, so that no HTTP client can take the collector's descriptors.

With the web server in the collector's process, 300 connections holding half a request used every
descriptor: after a broker restart the collector could not reconnect (``Too many open files``) and
stored nothing until the connections went away. Here the web server has its own descriptor table,
caps its connections below its own limit and cuts slow headers (``guard.py``); what it must learn
from the collector — /healthz and /metrics — it asks over one pipe, which the collector answers from
a thread of its own. Should the web process die, the collector starts it again; should the collector
die, the web process ends too.

The child is started with ``spawn`` (never ``fork``: a forked child would share the collector's
threads' locks and sockets), and receives the token through the pipe, never on its command line.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import resource
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from battery_trace.server.config import WebSettings
from battery_trace.server.store import RuleSettings

log = logging.getLogger(__name__)
RESERVED_FDS = 64  # the store, the pipe, logs, imports: what the web process needs besides its clients
# The listen backlog is also how many connections asyncio accepts in one go; a refused one is closed
# a few turns of the loop later, while more are accepted: measured, up to three bursts are in flight.
BACKLOG = 16
IN_FLIGHT = 4 * BACKLOG
ASK_TIMEOUT_S = 5.0
RESTART_MAX_S = 30.0


@dataclass(frozen=True)
class WebJob:
    """What the web process needs; pickled through the pipe (the token stays off the command line)."""

    settings: WebSettings
    store_url: str
    rules: RuleSettings
    token: str
    log_level: int


def connection_cap(wanted: int) -> int:
    """At most ``wanted`` clients, and never so many that the process runs out of descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - RESERVED_FDS - IN_FLIGHT))


class WebProcess:
    """Runs and supervises the web process; answers its questions (``health``, ``metrics``)."""

    def __init__(self, job: WebJob, answers: dict[str, Callable[[], object]]) -> None:
        self.job, self.answers = job, answers
        self.stopping = threading.Event()
        self.process: multiprocessing.process.BaseProcess | None = None
        self.thread = threading.Thread(target=self._supervise, name="web-supervisor", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        process = self.process
        if process is not None and process.is_alive():
            process.terminate()  # SIGTERM: uvicorn closes its connections and exits
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.thread.join(timeout=15)

    def _supervise(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            ours, theirs = multiprocessing.Pipe()
            spawn = multiprocessing.get_context("spawn")
            process = spawn.Process(target=serve, args=(theirs,), name="web", daemon=True)
            process.start()
            theirs.close()
            self.process = process
            ours.send(self.job)
            self._answer(ours, process)
            ours.close()
            process.join()
            if self.stopping.is_set():
                return
            log.error("the web process exited with %s; starting it again in %.1f s", process.exitcode, backoff)
            if self.stopping.wait(backoff):
                return
            backoff = min(backoff * 2, RESTART_MAX_S)

    def _answer(self, conn: Connection, process: multiprocessing.process.BaseProcess) -> None:
        """Answer until the web process goes away (its end of the pipe closes)."""
        while True:
            try:
                number, question = conn.recv()
            except (EOFError, OSError):
                return
            try:
                answer = self.answers[question]()
            except Exception:  # a question must not end the answering thread; None: "could not say"
                log.exception("the web process asked %r and got no answer", question)
                answer = None
            try:
                conn.send((number, answer))
            except (BrokenPipeError, OSError):
                return


class Asker:
    """The web process's side of the pipe: one question at a time, each answered within a timeout."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.numbers = itertools.count()

    def __call__(self, question: str) -> object:
        with self.lock:
            number = next(self.numbers)
            self.conn.send((number, question))
            while self.conn.poll(ASK_TIMEOUT_S):
                answered, answer = self.conn.recv()
                if answered == number:  # older answers came too late for their asker: dropped
                    return answer
            raise TimeoutError(f"the collector did not answer {question!r} within {ASK_TIMEOUT_S:g} s")


def serve(conn: Connection) -> None:
    """The web process: the dashboard, its API, /metrics and /healthz, until SIGTERM or the collector ends."""
    import uvicorn
    from battery_trace.server import log_limit
    from battery_trace.server.store import Store
    from battery_trace.server.web.app import create_app
    from battery_trace.server.web.guard import GuardedH11

    job: WebJob = conn.recv()
    logging.basicConfig(level=job.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_limit.install()
    _end_with_parent()
    ask = Asker(conn)

    def healthy() -> tuple[bool, str]:
        try:
            answer = ask("health")
        except (TimeoutError, EOFError, OSError) as exc:
            return False, f"the collector does not answer ({exc})"
        return answer or (False, "the collector could not say")  # type: ignore[return-value]

    def exposition() -> bytes:
        answer = ask("metrics")
        if not isinstance(answer, bytes):
            raise TimeoutError("the collector could not give its metrics")
        return answer

    store = Store(job.store_url, job.rules)
    settings = job.settings
    cap = connection_cap(settings.max_connections)
    host, port = settings.listen  # type: ignore[misc]
    app = create_app(store, job.token, healthy, exposition)
    protocol = GuardedH11.configure(cap, settings.header_timeout_s)
    config = uvicorn.Config(
        app, host=host, port=port, http=protocol, log_level="warning", lifespan="off", backlog=BACKLOG
    )
    log.info("web process %d: at most %d connections, headers within %g s", os.getpid(), cap, settings.header_timeout_s)
    try:
        uvicorn.Server(config).run()
    finally:
        store.close()


def _end_with_parent() -> None:
    """The collector may be killed (SIGKILL, OOM): then this process must not live on, serving the port."""
    parent = multiprocessing.parent_process()

    def watch() -> None:
        if parent is not None:
            parent.join()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
