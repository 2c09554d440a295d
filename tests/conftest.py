"""Shared fixtures. Integration tests need real services: when CI is set they fail, never skip, if one is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from harness.broker import Broker, BrokerUnavailable

settings.register_profile("ci", max_examples=200, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def missing_service(what: str, why: object) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required when CI is set, and it is missing: {why}")
    pytest.skip(f"{what} unavailable: {why}")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private mosquitto on a free port, killed and restartable by the test."""
    try:
        b = Broker(tmp_path / "broker").start()
    except BrokerUnavailable as exc:
        missing_service("mosquitto", exc)
    yield b
    b.stop()
