"""battery-agent decode on captures as field engineers bring them: candump logs, ASC files, bare
ID#DATA lines, hex dumps of serial traffic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import can
from battery_trace.firmware_stubs import dbc_pack, gbt27930_bms, jbd_bms

from tests.test_dbc import DBC

SESSION = [(f.arbitration_id, f.data) for f in gbt27930_bms.charging_session(gbt27930_bms.Pack(), rounds=2)]


def decode(*args: str, stdin: str | None = None) -> tuple[int, list[dict], str]:
    done = subprocess.run(
        [sys.executable, "-m", "battery_trace.agent.cli", "decode", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines()], done.stderr


def test_a_candump_log_of_a_charging_session(tmp_path):
    log = tmp_path / "session.log"
    log.write_text(
        "".join(f"({1700000000 + i * 0.01:.6f}) can0 {i_:08X}#{d.hex().upper()}\n" for i, (i_, d) in enumerate(SESSION))
    )
    code, messages, err = decode("--protocol", "gbt27930", str(log))
    assert code == 0 and "dropped: none" in err
    names = [m["message"] for m in messages]
    assert names[:4] == ["CHM", "BHM", "CRM", "BRM"] and names.count("BCS") == 2
    brm = next(m for m in messages if m["message"] == "BRM")
    assert brm["vin"] == "LNBSCB3F1PW123456" and brm["rated_voltage_v"] == 350.4


def test_an_asc_file_written_by_other_tools(tmp_path):
    path = tmp_path / "session.asc"
    with can.ASCWriter(str(path)) as writer:
        for n, (ident, data) in enumerate(SESSION):
            writer.on_message_received(can.Message(timestamp=n * 0.01, arbitration_id=ident, data=data))
    code, messages, _ = decode("--protocol", "gbt27930", str(path))
    assert code == 0 and sum(m["message"] == "BMV" for m in messages) == 2


def test_bare_lines_with_a_broken_one_and_a_lost_packet():
    lines = [f"{i:08X}#{d.hex()}" for i, d in SESSION]
    lines.insert(3, "this is not a frame")
    del lines[6]  # a TP.DT packet of the BRM transfer
    code, messages, err = decode("--protocol", "gbt27930", "-", stdin="\n".join(lines) + "\n")
    assert code == 0
    assert "line 4: bad_line" in err and "tp_" in err
    assert "BRM" not in [m["message"] for m in messages]


def test_a_vendor_pack_through_its_dbc(tmp_path):
    frames = dbc_pack.broadcast(dbc_pack.VendorPack())
    stdin = "".join(f"{i:08X}#{d.hex()}\n" for i, d in frames) + "12345678#00\n"
    code, messages, err = decode("--protocol", "dbc", "--dbc", str(DBC), "-", stdin=stdin)
    assert code == 0 and "1 unknown_id" in err
    status = next(m for m in messages if m["message"] == "PackStatus")
    assert status["PackVoltage"] == 398.2 and status["StateOfCharge"] == 71.5
    assert decode("--protocol", "dbc", "-", stdin=stdin)[0] == 2  # no --dbc


def test_serial_captures_as_hex_text(tmp_path):
    state = jbd_bms.PackState(cells_mv=[3300, 3310])
    stream = (
        b"\x00\x13"
        + jbd_bms.response(0x03, jbd_bms.basic_payload(state))
        + jbd_bms.response(0x04, jbd_bms.cells_payload(state))
    )
    capture = tmp_path / "uart.hex"
    capture.write_text("\n".join(stream.hex()[i : i + 32] for i in range(0, len(stream.hex()), 32)))
    code, messages, err = decode("--protocol", "jbd", str(capture))
    assert code == 0 and [m["message"] for m in messages] == ["basic_info", "cell_voltages"]
    assert messages[1]["cells_v"] == [3.3, 3.31] and "garbage" in err
    daly = "A5 01 90 08 02 FC 00 00 75 A1 00 00 52"
    assert decode("--protocol", "daly", "-", stdin=daly)[1][0]["voltage_v"] == 76.4


def test_exit_codes_for_nothing_decoded_and_usage_errors(tmp_path):
    assert decode("--protocol", "jbd", "-", stdin="00 11 22")[0] == 1
    assert decode("--protocol", "jbd", "-", stdin="zz")[0] == 2
    assert decode("--protocol", "gbt27930", str(tmp_path / "missing.log"))[0] == 2
    assert decode("--protocol", "modbus", "-", stdin="")[0] == 2
    assert Path(DBC).exists()
