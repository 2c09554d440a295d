"""``run``: the collector, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from server.cli.common import OK, add_config, config
from server.cli.registry import server_key

log = logging.getLogger("battery-server")


def run(args: argparse.Namespace) -> int:
    from server.intake import Collector
    from server.store import Store, StoreUnavailable

    cfg = config(args)
    key = server_key(cfg.key_path)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    backoff = 0.5
    while True:  # a store that is down at start-up is waited for, like one that goes down later
        try:
            store = Store(cfg.store_url, cfg.rules)
            break
        except StoreUnavailable as exc:
            log.error("%s; retrying in %.1f s", exc, backoff)
            if stop.wait(backoff):
                return OK
            backoff = min(backoff * 2, 10.0)
    collector = Collector(cfg.intake, store, key)
    log.info("server key %s; store %s; broker %s:%s", key.public.hex, cfg.store_url, cfg.intake.host, cfg.intake.port)
    collector.start()
    try:
        collector.run(stop)
    finally:
        collector.stop()
        store.close()
        log.info("stopped: %s", dict(collector.counters))
    return OK


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="run the collector",
        description="Subscribe to every device's events (shared subscription), verify, store in batches, "
        "acknowledge after commit and send signed receipts. Stops cleanly on SIGTERM or Ctrl-C.",
        epilog="example:\n  battery-server run -c configs/server.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(r)
    r.set_defaults(func=run)
