"""The record on both backends: derived state and findings from real sealed events, registry lifecycle,
queries, audit and export."""

from __future__ import annotations

import pytest
from battery_trace.server.audit import audit_chain
from battery_trace.server.records import Rejected
from battery_trace.server.store import RuleSettings, Store

from tests.world import DAY, T0, World

PACK, PACK_B, PACK_C = "0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124", "0RJPEA00HAU0AAG1C3000125"
VIN = "LNBSCB3F1PW123456"
HEALTH = {"soc_pct": 80, "voltage_v": 350.0}


@pytest.fixture
def world(store_url):
    store = Store(store_url, RuleSettings(unaccounted_days=30, gap_minutes=0))
    yield World(store)
    store.close()


def test_a_battery_life_is_traced_in_event_order(world):
    mfr, maker = world.device("mfr-1", "manufacturer"), world.device("maker-1", "vehicle_maker")
    station, scrapper = world.device("station-1", "swap_operator"), world.device("scrap-1", "scrapper")
    world.send(
        mfr,
        "produced",
        {
            "code": PACK,
            "chemistry": "lfp",
            "rated_capacity_ah": 150.0,
            "rated_energy_kwh": 52.0,
            "children": ["0RJMEA00HAU0AAG1C3000200"],
        },
        T0,
    )
    # The station's swap reaches the server before the maker's (late) installation report.
    swap = {"vin": VIN, "code_out": PACK, "code_in": PACK_B, "health_out": HEALTH, "health_in": {"soc_pct": 99}}
    world.send(station, "swapped", {**swap, "slot_out": 1, "slot_in": 2}, T0 + 20 * DAY)
    world.send(maker, "installed", {"code": PACK, "vin": VIN}, T0 + DAY, delay_ms=25 * DAY)
    world.send(station, "health", {"code": PACK, "health": {"soc_pct": 50}, "slot": 1}, T0 + 21 * DAY)
    world.send(scrapper, "vehicle_scrapped", {"vin": VIN, "codes": [PACK_B]}, T0 + 300 * DAY)

    trace = world.store.trace(PACK)
    assert [e["type"] for e in trace["events"]] == ["produced", "installed", "swapped", "health"]
    assert trace["state"] == "in_stock" and trace["place"] == "station-1"
    assert [h["soc_pct"] for h in trace["health"]] == [80, 50]
    assert trace["links"]["parts"] == ["0RJMEA00HAU0AAG1C3000200"]
    # Until the installation arrived the swap looked wrong; put in its place, the late installation
    # explains it: that finding is resolved, and what stays open is the lateness.
    assert {f["kind"]: f["resolved_at"] is None for f in trace["findings"]} == {
        "not_in_vehicle": False,
        "late_report": True,
    }
    assert world.store.vehicle(VIN)["state"] == "scrapped"
    assert world.store.trace(PACK_B)["state"] == "retired"


def test_each_store_level_finding_is_raised(world):
    maker, scrapper = world.device("maker-1", "vehicle_maker"), world.device("scrap-1", "scrapper")
    recycler, station = world.device("recycler-1", "recycler"), world.device("station-1", "swap_operator")
    world.send(maker, "installed", {"code": PACK, "vin": VIN}, T0)
    world.send(maker, "installed", {"code": PACK_B, "vin": VIN}, T0)
    world.send(maker, "installed", {"code": "0RJXEA00HAU0AAG1C3000999", "vin": "LNBSCB3F5PW000001"}, T0)
    world.send(scrapper, "vehicle_scrapped", {"vin": VIN, "codes": [PACK]}, T0 + 10 * DAY)
    world.send(
        scrapper,
        "handed_over",
        {"code": PACK, "from_entity": "S", "to_entity": "Swapper", "to_role": "swap_operator"},
        T0 + 11 * DAY,
    )
    world.send(recycler, "recycled", {"code": PACK, "mass_kg": 300.0, "materials": {"li": 4.0}}, T0 + 12 * DAY)
    world.send(station, "health", {"code": PACK, "health": HEALTH}, T0 + 13 * DAY)
    world.send(maker, "installed", {"code": PACK_C, "vin": "LNBSCB3F5PW000002"}, T0, delay_ms=40 * DAY)
    assert world.open_findings() == sorted(
        [
            ("invalid_code", "battery:0RJXEA00HAU0AAG1C3000999"),
            ("incomplete_scrapping", f"vehicle:{VIN}"),
            ("unauthorised_receiver", f"battery:{PACK}"),
            ("after_end_of_life", f"battery:{PACK}"),
            ("late_report", f"battery:{PACK_C}"),
        ]
    )
    invalid = world.store.findings(kind="invalid_code")[0]
    assert "position 4" in invalid["detail"]


def test_unaccounted_is_raised_by_the_sweep_and_resolved_by_a_new_event(world):
    maker, scrapper = world.device("maker-1", "vehicle_maker"), world.device("scrap-1", "scrapper")
    world.send(maker, "installed", {"code": PACK, "vin": VIN}, T0)
    world.send(scrapper, "vehicle_scrapped", {"vin": VIN, "codes": [PACK]}, T0 + DAY)
    world.store.sweep((T0 + 20 * DAY) / 1000)
    assert world.open_findings("unaccounted") == []
    world.store.sweep((T0 + 40 * DAY) / 1000)
    assert world.open_findings("unaccounted") == [("unaccounted", f"battery:{PACK}")]
    world.send(
        scrapper,
        "handed_over",
        {"code": PACK, "from_entity": "S", "to_entity": "R", "to_role": "recycler"},
        T0 + 41 * DAY,
    )
    assert world.open_findings("unaccounted") == []


def test_chain_break_and_sequence_gap(world):
    station = world.device("station-1", "swap_operator")
    first = station.seal("health", {"code": PACK, "health": HEALTH}, T0)
    station.seal("health", {"code": PACK, "health": HEALTH}, T0 + 1000)  # seq 2: lost on the way
    station.prev = b"\x07" * 32  # the device's store was tampered with: seq 3 links to nothing real
    third = station.seal("health", {"code": PACK, "health": HEALTH}, T0 + 2000)
    world.deliver(station, first, T0 + 60_000)
    result = world.deliver(station, third, T0 + 60_000)
    assert result.watermarks[station.key.public.kid][1] == 1
    world.store.sweep((T0 + 3_600_000) / 1000)
    assert world.open_findings() == [("sequence_gap", "device:station-1")]
    world.deliver(station, station.sent[1], T0 + 3_700_000)  # the lost event turns up
    assert world.open_findings() == [("chain_break", "device:station-1")]
    world.store.sweep((T0 + 3_800_000) / 1000)
    assert world.open_findings() == [("chain_break", "device:station-1")]  # the gap is resolved, the break is not
    device = world.store.device("station-1")
    # Seq 3 is stored as evidence, but a receipt covers only a linked chain: the watermark stops before it.
    assert device["chain"] == "broken" and device["keys"][0]["watermark"] == 2


def test_device_view_lists_missing_ranges(world):
    station = world.device("station-1", "swap_operator")
    sealed = [station.seal("health", {"code": PACK, "health": HEALTH}, T0 + i) for i in range(8)]
    for i in (0, 1, 4, 7):
        world.deliver(station, sealed[i], T0 + 60_000)
    key = world.store.device("station-1")["keys"][0]
    assert (key["watermark"], key["max_seq"], key["missing"]) == (2, 8, [[3, 4], [6, 7]])


def test_rotation_keeps_earlier_events_and_refuses_later_ones(world):
    from battery_trace.protocol import keys

    station = world.device("station-1", "swap_operator")
    before = station.seal("health", {"code": PACK, "health": HEALTH}, T0)
    after = station.seal("health", {"code": PACK, "health": HEALTH}, T0 + 2 * DAY)
    world.store.rotate("station-1", keys.generate().public, (T0 + DAY) / 1000)
    assert world.check(station, before, T0 + 3 * DAY).event.seq == 1  # sealed before: accepted late
    late = world.check(station, after, T0 + 3 * DAY)
    assert isinstance(late, Rejected) and late.reason == "key_not_active"
    states = [k["key_state"] for k in world.store.devices()]
    assert states == ["retired", "active"]


def test_revocation_refuses_new_events_and_flags_stored_ones_after_a_backdated_time(world):
    station = world.device("station-1", "swap_operator")
    world.send(station, "health", {"code": PACK, "health": HEALTH}, T0)
    world.send(station, "health", {"code": PACK, "health": HEALTH}, T0 + 2 * DAY)
    revoked, flagged = world.store.revoke("station-1", (T0 + DAY) / 1000)
    assert len(revoked) == 1 and flagged == 1
    assert world.open_findings() == [("revoked_key", "device:station-1")]
    refused = world.check(station, station.seal("health", {"code": PACK, "health": HEALTH}, T0), T0 + 3 * DAY)
    assert isinstance(refused, Rejected) and refused.reason == "key_revoked"
    with pytest.raises(Exception, match="already revoked"):
        world.store.revoke("station-1", (T0 + 2 * DAY) / 1000)  # later than the revocation: nothing to do


def test_audit_finds_the_first_tampered_envelope(world):
    station = world.device("station-1", "swap_operator")
    for i in range(5):
        world.send(station, "health", {"code": PACK, "health": HEALTH}, T0 + i)
    (key,) = world.store.device_keys("station-1")
    assert audit_chain(key, world.store.chain(key.kid)).first_break is None
    chain = world.store.chain(key.kid)
    tampered = [(s, e if s != 3 else e[:-10] + bytes(10)) for s, e in chain]
    result = audit_chain(key, tampered)
    assert result.first_break["seq"] == 3 and result.head == 2 and "does not verify" in result.first_break["problem"]
    missing = audit_chain(key, [c for c in chain if c[0] != 2])
    assert missing.first_break == {"seq": 2, "problem": "seq 2..2 missing"}


def test_export_window_by_arrival_or_event_time(world):
    station = world.device("station-1", "swap_operator")
    world.send(station, "health", {"code": PACK, "health": HEALTH}, T0, delay_ms=DAY)
    world.send(station, "health", {"code": PACK, "health": HEALTH}, T0 + 2 * DAY, delay_ms=1000)
    by_arrival = list(world.store.export((T0 + DAY) / 1000, (T0 + 2 * DAY) / 1000))
    assert [r[2] for r in by_arrival] == [1]
    by_time = list(world.store.export(T0 / 1000, (T0 + DAY) / 1000, by_time=True))
    assert [r[2] for r in by_time] == [1]
    assert by_time[0][7]["code"] == PACK
