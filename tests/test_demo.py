"""The README's main command tells the whole story: every site, the rejects, the findings, one life."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_the_demo_tells_one_battery_s_whole_life_with_rejects_and_findings(tmp_path, broker):
    # ``broker`` only makes sure mosquitto is installed (and fails loudly in CI if not); the demo starts its own.
    done = subprocess.run(
        [sys.executable, "-m", "harness.demo", "--fresh", "--workdir", str(tmp_path / "demo"), "--duration", "10"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert "the story stopped at" not in out, out
    assert "dashboard  http://127.0.0.1:" in out

    def figure(label: str) -> str:
        match = re.search(rf"{re.escape(label)}\s+(.+)", out)
        assert match, f"{label!r} missing from the summary:\n{out}"
        return match.group(1)

    sealed, delivered = (
        int(figure("sealed by the agents and submitters")),
        int(figure("delivered (receipted by the server)")),
    )
    assert delivered >= sealed - 5  # the last few may still be in flight
    assert json.loads(figure("rejected (quarantined) by reason")) == {
        "bad_signature": 1,
        "device_mismatch": 1,
        "role_not_allowed": 1,
        "sequence_reused": 1,
        "unknown_key": 1,
    }
    assert json.loads(figure("open findings by kind")) == {"chain_break": 1, "incomplete_scrapping": 1}
    by_type = json.loads(figure("events by type"))
    lifecycle = sum(n for event_type, n in by_type.items() if event_type != "health")
    # Health snapshots keep coming on top of the story's lifecycle events (how many depends on the
    # machine's load in those 10 s, so no fixed floor).
    assert by_type.get("health", 0) > 0 and sealed > lifecycle
    assert by_type["swapped"] == 3 and by_type["produced"] == 10 and by_type["maintenance"] == 1
    life = out.split("== The life of battery")[1]
    stages = re.findall(r"^\s+\S+ \S+\s+(\w+)\s", life, flags=re.M)
    assert stages == [
        "produced",
        "installed",
        "swapped",
        "swapped",
        "maintenance",
        "vehicle_scrapped",
        "handed_over",
        "recycled",
    ], life
