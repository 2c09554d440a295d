"""The test harness itself: a missing service fails the run in CI instead of silently skipping."""

import pytest

from tests.conftest import missing_service


def test_missing_service_fails_when_ci_is_set(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required when CI is set"):
        missing_service("mosquitto", "not installed")


def test_missing_service_skips_on_a_developer_machine(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        missing_service("mosquitto", "not installed")
