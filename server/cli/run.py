"""``run``: the collector, the device status listener and the web (dashboard, JSON API, /metrics,
/healthz), until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from battery_trace.server.cli.common import INVALID, OK, add_config, config
from battery_trace.server.cli.first_run import next_server_key, server_key, web_token

log = logging.getLogger("battery-server")


def run(args: argparse.Namespace) -> int:
    import uvicorn
    from battery_trace.server.intake import Collector
    from battery_trace.server.store import Store, StoreUnavailable
    from battery_trace.server.web.app import create_app
    from battery_trace.server.web.status_listener import StatusListener

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
    web = listener = web_thread = None
    if cfg.web.listen:
        host, port = cfg.web.listen

        def healthy() -> tuple[bool, str]:
            problems = [] if collector.connected.is_set() else ["not subscribed at the broker"]
            if not collector.store_ok.is_set():
                problems.append("store unavailable")
            return not problems, "; ".join(problems) or "ok"

        app = create_app(store, token, healthy)
        web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
        web_thread = threading.Thread(target=web.run, name="web", daemon=True)
        web_thread.start()
        listener = StatusListener(cfg.intake.host, cfg.intake.port, cfg.intake.client_id, store, cfg.intake.tls)
        listener.start()
        log.info("dashboard: http://%s:%d/?token=TOKEN, TOKEN from %s", host, port, token_from)
    try:
        collector.run(stop)
    finally:
        if web is not None and web_thread is not None:
            web.should_exit = True
            web_thread.join(timeout=10)
        if listener is not None:
            listener.stop()
        collector.stop()
        store.close()
        log.info("stopped: %s", dict(collector.counters))
    return OK if collector.failure is None else INVALID


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
