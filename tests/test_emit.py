"""battery-agent emit: values converted by field, every problem named with its line, all or nothing,
and delivered to a real server with a receipt."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from battery_trace.agent import emit
from battery_trace.agent.sealer import Draft
from battery_trace.protocol.events import Kind

from harness import agents

PACK = "0RJPEA00HAU0AAG1C3000123"
NOW = 1_767_225_600_000


def test_values_are_converted_by_the_fields_kind():
    d = emit.from_arguments(
        "recycled",
        [f"code={PACK.lower()}", "mass_kg=310.5", 'materials={"li": 4.2, "co": 3.1}', "intake_time=2026-01-02"],
        "manual",
        "2026-01-05T10:00:00Z",
        NOW,
    )
    assert isinstance(d, Draft)
    assert d.fields == {
        "code": PACK,
        "mass_kg": 310.5,
        "materials": {"li": 4.2, "co": 3.1},
        "intake_time": 1767312000000,
    }
    assert d.time_ms == 1767607200000 and d.source == "manual"
    assert emit.convert(Kind.CODES, f"{PACK}, 0RJPEA00HAU0AAG1C3000124") == [PACK, "0RJPEA00HAU0AAG1C3000124"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["code=" + PACK, "mass_kg=heavy", 'materials={"li": 1}'], "mass_kg: 'heavy' is not a number"),
        (["code=" + PACK, "mass_kg=3", "materials=li:4"], "is not a JSON object"),
        (["code=" + PACK, "mass_kg=3"], "materials: is required"),
        (["code=0RJXEA00HAU0AAG1C3000123", "mass_kg=3", 'materials={"li": 1}'], "position 4"),
        (["code=" + PACK, "mass_kg=3", 'materials={"li": 1}', "colour=red"], "colour: is not a field of 'recycled'"),
        (["code"], "must be NAME=VALUE"),
    ],
)
def test_every_problem_names_the_field_and_what_is_valid(args, fragment):
    result = emit.from_arguments("recycled", args, "manual", None, NOW)
    assert isinstance(result, list) and any(fragment in str(e) for e in result), result


def test_files_report_each_bad_line(tmp_path):
    jsonl = tmp_path / "events.jsonl"
    jsonl.write_text(
        json.dumps({"type": "installed", "code": PACK, "vin": "LNBSCB3F1PW123456"}) + "\n"
        + "{not json\n"
        + json.dumps({"type": "installed", "code": PACK, "vin": "LNBSCB3F5PW12345O"}) + "\n"
        + "\n"
        + json.dumps(["not", "an", "object"]) + "\n"
    )  # fmt: skip
    results = list(emit.from_file(jsonl, "file", NOW))
    assert isinstance(results[0], Draft) and results[0].source == "file"
    problems = [str(e) for r in results[1:] for e in r]
    assert problems[0].startswith("line 2: not JSON")
    assert problems[1].startswith("line 3: vin") and problems[2] == "line 5: each line must be a JSON object"
    csv_file = tmp_path / "events.csv"
    csv_file.write_text(f"type,code,vin,time\ninstalled,{PACK},LNBSCB3F1PW123456,2026-01-02\ninstalled,{PACK},,\n")
    drafts = list(emit.from_file(csv_file, "file", NOW))
    assert isinstance(drafts[0], Draft) and drafts[0].time_ms == 1767312000000
    assert [str(e) for e in drafts[1]] == ["line 3: vin: is required for 'installed' (VIN)"]
    headless = tmp_path / "bad.csv"
    headless.write_text(f"{PACK},x\n")
    assert "header row" in str(next(iter(emit.from_file(headless, "file", NOW)))[0])


@pytest.mark.integration
def test_emit_seals_delivers_and_is_receipted(tmp_path, record_server):
    key = record_server.device("mfr-1", "manufacturer")
    config, _ = agents.write_config(
        tmp_path / "mfr.toml",
        "mfr-1",
        key,
        record_server.public.hex,
        record_server.broker,
        "submitter",
        "",
        role="manufacturer",
    )

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "battery_trace.agent.cli", "emit", *args, "-c", str(config), "--timeout", "20"]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    one = run(
        "produced",
        f"--field=code={PACK}",
        "--field=chemistry=ncm",
        "--field=rated_capacity_ah=150",
        "--field=rated_energy_kwh=52.5",
        "--field=children=0RJMEA00HAU0AAG1C3000200",
    )
    assert one.returncode == 0, one.stderr
    assert "delivered" in one.stdout
    batch = tmp_path / "day.csv"
    rows = [f"produced,0RJPEA00HAU0AAG1C300{n:04d},lfp,150,50" for n in range(200, 210)]
    batch.write_text("type,code,chemistry,rated_capacity_ah,rated_energy_kwh\n" + "\n".join(rows) + "\n")
    many = run("--file", str(batch))
    assert many.returncode == 0, many.stderr
    produced = record_server.events("produced")
    assert len(produced) == 11 and {e.source for e in produced} == {"manual", "file"}
    assert produced[0].fields["children"] == ["0RJMEA00HAU0AAG1C3000200"]
    wrong_role = run("installed", f"--field=code={PACK}", "--field=vin=LNBSCB3F1PW123456")
    assert wrong_role.returncode == 1 and "a manufacturer may not sign 'installed'" in wrong_role.stderr
    broken = tmp_path / "broken.csv"
    broken.write_text(
        "type,code,chemistry,rated_capacity_ah,rated_energy_kwh\nproduced,X,lfp,1,1\nproduced,Y,lfp,1,1\n"
    )
    refused = run("--file", str(broken))
    assert refused.returncode == 1 and "nothing sealed: 2 problem(s)" in refused.stderr
    assert len(record_server.events("produced")) == 11
