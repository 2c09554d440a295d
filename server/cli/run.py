"""``run``: the collector, the device status listener and the web (dashboard, JSON API, /metrics,
/healthz), until SIGTERM or Ctrl-C. The web server runs in a child process (server/web/process.py), so
that no HTTP client can take the collector's file descriptors."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import threading
from typing import TYPE_CHECKING

from battery_trace.server.cli.common import INVALID, OK, add_config, config
from battery_trace.server.cli.first_run import next_server_key, server_key, web_token

if TYPE_CHECKING:
    from battery_trace.server.config import ServerConfig
    from battery_trace.server.intake import Collector
    from battery_trace.server.store import Store
    from battery_trace.server.web.process import WebProcess

log = logging.getLogger("battery-server")


def run(args: argparse.Namespace) -> int:
    from battery_trace.server import log_limit
    from battery_trace.server.intake import Collector
    from battery_trace.server.store import Store, StoreUnavailable
    from battery_trace.server.web.status_listener import StatusListener

    log_limit.install()
    cfg = config(args)
    key = server_key(cfg.key_path, args)
    token, token_from = web_token(cfg, args) if cfg.web.listen else ("", "")  # refused before anything starts
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    backoff = 0.5
    while True:  # a store that is down at start-up is waited for, like one that goes down later
        try:
            store = Store(cfg.store_url, cfg.rules, cfg.quarantine)
            break
        except StoreUnavailable as exc:
            log.error("%s; retrying in %.1f s", exc, backoff)
            if stop.wait(backoff):
                return OK
            backoff = min(backoff * 2, 10.0)
    collector = Collector(cfg.intake, store, key, next_server_key(cfg, args))
    log.info("server key %s; store %s; broker %s:%s", key.public.hex, cfg.store_shown, cfg.intake.host, cfg.intake.port)
    collector.start()
    web = listener = None
    if cfg.web.listen:
        host, port = cfg.web.listen
        web = _web_process(cfg, token, collector, store)
        web.start()
        listener = StatusListener(cfg.intake.host, cfg.intake.port, cfg.intake.client_id, store, cfg.intake.tls)
        listener.start()
        log.info("dashboard: http://%s:%d/#token=TOKEN, TOKEN from %s", host, port, token_from)
    try:
        collector.run(stop)
    finally:
        if web is not None:
            web.stop()
        if listener is not None:
            listener.stop()
        collector.stop()
        store.close()
        log.info("stopped: %s", dict(collector.counters))
    return OK if collector.failure is None else INVALID


def _web_process(cfg: ServerConfig, token: str, collector: Collector, store: Store) -> WebProcess:
    """The web process, and the answers it asks the collector for (/healthz, /metrics)."""
    from battery_trace.server import metrics, pki
    from battery_trace.server.web.app import device_counts
    from battery_trace.server.web.process import WebJob, WebProcess
    from prometheus_client import generate_latest

    def healthy() -> tuple[bool, str]:
        problems = [] if collector.connected.is_set() else ["not subscribed at the broker"]
        if not collector.store_ok.is_set():
            problems.append("store unavailable")
        if cfg.crl_path is not None and (crl := pki.crl_problem(cfg.crl_path, dt.datetime.now(dt.UTC))):
            problems.append(crl)
        return not problems, "; ".join(problems) or "ok"

    if cfg.crl_path is not None:
        crl_path = cfg.crl_path
        metrics.CRL.read = lambda: n.timestamp() if (n := pki.crl_next_update(crl_path)) else None

    metrics.DEVICES.read = lambda: device_counts(store)
    job = WebJob(cfg.web, cfg.store_url, cfg.rules, token, logging.getLogger().getEffectiveLevel())
    return WebProcess(job, {"health": healthy, "metrics": lambda: generate_latest(metrics.REGISTRY)})


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="run the collector and the dashboard",
        description="Subscribe to every device's events (shared subscription), verify, store in batches, "
        "acknowledge after commit and send signed receipts; serve the dashboard, its JSON API, /metrics and "
        "/healthz ([web] listen). Needs the server key and the dashboard token that `battery-server init` "
        "creates (or $BT_WEB_TOKEN); refuses to start without them, or with a token under 32 characters. "
        "Stops cleanly on SIGTERM (exit 0); exits 1 after an internal failure, for the service manager to "
        "restart it (what was not acknowledged is delivered again).",
        epilog="example:\n  battery-server run -c configs/server.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(r)
    r.set_defaults(func=run)
