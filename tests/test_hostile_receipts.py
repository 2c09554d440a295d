"""Receipts never make an agent prune what the server did not store, on real agent and collector processes.

A station's outbox replaced while its key stays (a restored image, a cloned SD card) seals new events
under sequence numbers the server already holds: the server quarantines them, and a receipt for its
own chain must not delete them from the agent. After a key rotation the old key's backlog is still
receipted, and pruned, under the old key.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from battery_trace.protocol import keys

from harness import agents
from harness.pipeline import chain_head
from harness.waiting import wait_until

pytestmark = [pytest.mark.hostile, pytest.mark.integration]


def stored_seqs(server) -> list[int]:
    return sorted(e.seq for e in server.events())


def outbox_rows(path: Path) -> list[tuple[bytes, int]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        return db.execute("SELECT kid, seq FROM outbox ORDER BY kid, seq").fetchall()


def snapshot(outbox: Path, image: Path) -> None:
    """What an SD-card image taken now holds (SQLite's online backup: consistent while the agent writes)."""
    source, target = sqlite3.connect(outbox, timeout=5), sqlite3.connect(image)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


def test_a_restored_outbox_is_never_pruned_by_the_servers_own_chain(tmp_path, record_server, gateway):
    wait_until(lambda: len(stored_seqs(record_server)) >= 3, 30, "the first events", [gateway["process"]])
    image = tmp_path / "image.sqlite"
    snapshot(gateway["outbox"], image)
    restored_head = chain_head(image)
    wait_until(lambda: len(stored_seqs(record_server)) >= restored_head + 12, 30, "more events", [gateway["process"]])
    agents.stop(gateway["process"])
    for leftover in gateway["outbox"].parent.glob(gateway["outbox"].name + "-*"):
        leftover.unlink()
    shutil.copy(image, gateway["outbox"])  # the image comes back; the key stays what it was
    gateway["process"] = agents.start(gateway["config"], gateway["log"])
    port = gateway["port"]

    def reused() -> int:
        return sum(r["reason"] == "sequence_reused" for r in record_server.store.rejects(limit=1000))

    wait_until(lambda: reused() >= 5, 30, "the restored outbox's events to be quarantined", [gateway["process"]])
    wait_until(
        lambda: (agents.status(port) or {}).get("uplink", {}).get("receipts_foreign_chain", 0) >= 3,
        20,
        "receipts telling of the server's chain",
        [gateway["process"]],
    )
    head = chain_head(gateway["outbox"])
    kept = {seq for _, seq in outbox_rows(gateway["outbox"])}
    assert set(range(restored_head + 1, head + 1)) <= kept, "an event the server did not store left the outbox"
    status = agents.status(port)
    assert "not this outbox's" in status["uplink"]["alarm"]
    healthy, why = status_of_health(port)
    assert not healthy and "new key" in why
    assert "bt_agent_receipt_alarm 1" in metrics(port)


def status_of_health(port: int) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return True, response.read().decode()
    except urllib.error.HTTPError as exc:
        return False, exc.read().decode()


def metrics(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_after_a_key_rotation_the_old_keys_backlog_is_receipted_and_pruned(tmp_path, record_server, gateway):
    wait_until(lambda: len(stored_seqs(record_server)) >= 3, 30, "the first events", [gateway["process"]])
    record_server.stop_collector()  # a backlog builds up under the old key
    old_kid = keys.load_private(gateway["key"]).public.kid
    wait_until(lambda: len(outbox_rows(gateway["outbox"])) >= 10, 30, "a backlog", [gateway["process"]])
    agents.stop(gateway["process"])
    sealed_old = chain_head(gateway["outbox"])

    new_key = tmp_path / "gw-1-new.key"
    keys.save_private(keys.generate(), new_key)
    record_server.store.rotate("gw-1", keys.load_private(new_key).public, time.time())
    config = gateway["config"]
    config.write_text(config.read_text().replace(str(gateway["key"]), str(new_key)))
    record_server.start_collector()
    gateway["process"] = agents.start(config, gateway["log"])

    def old_backlog() -> list[int]:
        return [seq for kid, seq in outbox_rows(gateway["outbox"]) if kid == old_kid]

    wait_until(lambda: not old_backlog(), 40, "the old key's backlog to be receipted and pruned", [gateway["process"]])
    old_stored = sorted(e.seq for e in record_server.events() if e.seq <= sealed_old)
    assert set(range(1, sealed_old + 1)) <= set(old_stored)


def test_the_servers_key_is_rotated_without_stopping_receipts(tmp_path, record_server, gateway):
    """While [server] next_key is set, every receipt names the next key, signed by the current one; the
    agent keeps it beside its outbox, so once the server signs with it (and after an agent restart)
    receipts still prune. An agent that had pinned only the old key would refuse every receipt."""
    port = gateway["port"]

    def uplink() -> dict:
        return (agents.status(port) or {}).get("uplink", {})

    wait_until(lambda: uplink().get("receipts", 0) >= 3, 30, "the first receipts", [gateway["process"]])
    next_key = tmp_path / "server-next.key"
    keys.save_private(keys.generate(), next_key)
    config = record_server.config
    original = config.read_text()
    key_line = f'key = "{record_server.key_path}"\n'
    assert key_line in original
    record_server.stop_collector()
    config.write_text(original.replace(key_line, f'{key_line}next_key = "{next_key}"\n'))
    record_server.start_collector()
    wait_until(lambda: uplink().get("server_keys_learned", 0) >= 1, 30, "the next key to be learned")

    record_server.stop_collector()  # the switch: the server signs with the next key from now on
    config.write_text(original.replace(key_line, f'key = "{next_key}"\n'))
    record_server.start_collector()
    agents.stop(gateway["process"])  # and the agent restarts: what it learned is on its disk
    gateway["process"] = agents.start(gateway["config"], gateway["log"])
    wait_until(lambda: uplink().get("receipts", 0) >= 5, 30, "receipts signed by the new key", [gateway["process"]])
    assert uplink().get("receipts_refused", 0) == 0
    wait_until(lambda: len(outbox_rows(gateway["outbox"])) <= 10, 30, "the outbox to be pruned", [gateway["process"]])
