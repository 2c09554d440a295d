"""The record. ``open_store`` picks the backend from a URL; every backend has the same semantics."""

from __future__ import annotations

from pathlib import Path

from server.store.sqlite import SqliteStore, StoreError

__all__ = ["SqliteStore", "StoreError", "open_store"]


def open_store(url: str) -> SqliteStore:
    """``sqlite:PATH`` (or a bare path) opens the embedded store."""
    if url.startswith("sqlite:"):
        return SqliteStore(Path(url.removeprefix("sqlite:").removeprefix("//")))
    if "://" in url:
        raise StoreError(f"store URL {url!r} is not supported; valid: sqlite:PATH")
    return SqliteStore(Path(url))
