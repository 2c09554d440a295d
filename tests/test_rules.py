"""The lifecycle rules as pure functions: one test per finding, and order independence."""

import itertools

from battery_trace.server import rules
from battery_trace.server.rules import EventFacts

T0 = 1_767_225_600_000
DAY = rules.DAY_MS
PACK, PACK_B = "0RJPEA00HAU0AAG1C3000123", "0RJPEA00HAU0AAG1C3000124"
VIN, VIN_B = "LNBSCB3F1PW123456", "LNBSCB3F5PW654321"


def ev(n: int, event_type: str, day: float, device: str = "dev", **fields) -> EventFacts:
    return EventFacts(b"k", n, device, event_type, int(T0 + day * DAY), (T0 + day * DAY) / 1000 + 60, fields)


LIFE = [
    ev(1, "produced", 0, "mfr", code=PACK, chemistry="lfp", rated_capacity_ah=150, rated_energy_kwh=50),
    ev(2, "installed", 5, "maker", code=PACK, vin=VIN),
    ev(3, "swapped", 40, "station-1", vin=VIN, code_out=PACK, code_in=PACK_B, slot_out=1, slot_in=2),
    ev(
        4,
        "swapped",
        41,
        "station-1",
        vin=VIN_B,
        code_out="0RJPEA00HAU0AAG1C3000999",
        code_in=PACK,
        slot_out=3,
        slot_in=1,
    ),
    ev(5, "vehicle_scrapped", 400, "scrapper", vin=VIN_B, codes=[PACK]),
    ev(6, "handed_over", 401, "scrapper", code=PACK, from_entity="S", to_entity="R", to_role="recycler"),
    ev(7, "recycled", 420, "recycler", code=PACK, mass_kg=300, materials={"li": 4}),
]


def test_a_clean_life_ends_recycled_without_findings():
    state, found = rules.replay_battery(PACK, LIFE)
    assert found == []
    assert (state.state, state.final_ms) == ("recycled", LIFE[-1].time_ms)


def test_the_order_of_arrival_does_not_matter():
    expected = rules.replay_battery(PACK, LIFE)
    for order in itertools.islice(itertools.permutations(LIFE), 0, 5000, 97):
        assert rules.replay_battery(PACK, order) == expected


def test_double_installation():
    _, found = rules.replay_battery(
        PACK, [ev(1, "installed", 1, code=PACK, vin=VIN), ev(2, "installed", 2, code=PACK, vin=VIN_B)]
    )
    assert [(f.kind, f.ref) for f in found] == [("double_installation", (b"k", 2))]
    assert VIN in found[0].detail and VIN_B in found[0].detail


def test_not_in_vehicle():
    swapped_out_of_b = ev(2, "swapped", 3, vin=VIN_B, code_out=PACK, code_in=PACK_B, slot_out=1, slot_in=2)
    _, found = rules.replay_battery(PACK, [ev(1, "installed", 1, code=PACK, vin=VIN), swapped_out_of_b])
    assert [f.kind for f in found] == ["not_in_vehicle"] and "in " + VIN in found[0].detail
    _, unknown_before = rules.replay_battery(PACK, [swapped_out_of_b])
    assert unknown_before == []  # the record does not say where it was: no claim against the station


def test_unauthorised_receiver_of_a_retired_battery():
    scrapped = [ev(1, "installed", 1, code=PACK, vin=VIN), ev(2, "vehicle_scrapped", 2, vin=VIN, codes=[PACK])]
    to_station = ev(3, "handed_over", 3, code=PACK, from_entity="S", to_entity="Cheap Swaps", to_role="swap_operator")
    _, found = rules.replay_battery(PACK, [*scrapped, to_station])
    assert [f.kind for f in found] == ["unauthorised_receiver"] and "recycler, repurposer" in found[0].detail
    to_recycler = ev(3, "handed_over", 3, code=PACK, from_entity="S", to_entity="R", to_role="recycler")
    assert rules.replay_battery(PACK, [*scrapped, to_recycler])[1] == []


def test_incomplete_scrapping():
    life = [
        ev(1, "installed", 1, code=PACK, vin=VIN),
        ev(2, "installed", 1, code=PACK_B, vin=VIN),
        ev(3, "vehicle_scrapped", 300, vin=VIN, codes=[PACK]),
    ]
    v, found = rules.replay_vehicle(VIN, life)
    assert v.state == "scrapped"
    assert [(f.kind, f.subject, f.ref) for f in found] == [("incomplete_scrapping", f"vehicle:{VIN}", (b"k", 3))]
    assert PACK_B in found[0].detail
    swapped_first = [
        *life[:2],
        ev(4, "swapped", 100, vin=VIN, code_out=PACK_B, code_in="0RJPEA00HAU0AAG1C3000777", slot_out=1, slot_in=1),
        ev(5, "vehicle_scrapped", 300, vin=VIN, codes=[PACK, "0RJPEA00HAU0AAG1C3000777"]),
    ]
    assert rules.replay_vehicle(VIN, swapped_first)[1] == []


def test_late_report_counts_from_the_certificate_when_given():
    deadlines = rules.DEFAULT_DEADLINES_DAYS
    on_time = EventFacts(b"k", 1, "m", "installed", T0, (T0 + 14 * DAY) / 1000, {"code": PACK, "vin": VIN})
    assert rules.late_report(on_time, deadlines, "battery:X") is None
    late = EventFacts(b"k", 1, "m", "installed", T0, (T0 + 16 * DAY) / 1000, {"code": PACK, "vin": VIN})
    assert "16.0 days" in rules.late_report(late, deadlines, "battery:X").detail
    certified_early = EventFacts(
        b"k",
        1,
        "m",
        "installed",
        T0,
        (T0 + 10 * DAY) / 1000,
        {"code": PACK, "vin": VIN, "certificate_time": T0 - 20 * DAY},
    )
    assert rules.late_report(certified_early, deadlines, "battery:X") is not None
    health = EventFacts(b"k", 1, "g", "health", T0, (T0 + 999 * DAY) / 1000, {})
    assert rules.late_report(health, deadlines, "battery:X") is None


def test_unaccounted_after_the_window():
    state, _ = rules.replay_battery(
        PACK,
        [ev(1, "installed", 1, code=PACK, vin=VIN), ev(2, "vehicle_scrapped", 2, "scrapper", vin=VIN, codes=[PACK])],
    )
    assert rules.unaccounted(state, (b"k", 2), T0 + 31 * DAY, 30) is None
    finding = rules.unaccounted(state, (b"k", 2), T0 + 40 * DAY, 30)
    assert finding.kind == "unaccounted" and "retired" in finding.detail and "scrapper" in finding.detail
    in_service, _ = rules.replay_battery(PACK, [ev(1, "installed", 1, code=PACK, vin=VIN)])
    assert rules.unaccounted(in_service, (b"k", 1), T0 + 400 * DAY, 30) is None


def test_second_life_links_old_and_new_codes():
    new = "0RJPBA0G1C3000123"
    repurposed = ev(1, "repurposed", 10, code=PACK, new_code=new, application="storage")
    old_state, _ = rules.replay_battery(PACK, [repurposed])
    new_state, _ = rules.replay_battery(new, [repurposed])
    assert (old_state.state, new_state.state) == ("repurposed", "second_life")
