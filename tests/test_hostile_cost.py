"""One valid device cannot make everyone wait: a batch's cost depends on the batch, not on history.

Measured on main before the fix: 100 `produced` events with 1,024 children each took 16.6 s to commit
(each child's replay decoded the parent's envelope again); a battery with 5,000 earlier events made each
batch 20 times slower; a recycled battery re-raised every earlier after_end_of_life finding with every
batch; a chain with one hole read its whole tail in every later batch. The tests count the work (decodes,
replays, tail reads), which is what grows, instead of timing it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from battery_trace.server import rules
from battery_trace.server.store import Store, db, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.world import DAY, T0, World

pytestmark = pytest.mark.hostile
PACK = "0RJPEA00HAU0AAG1C3000123"
VIN = "LNBSCB3F1PW123456"


@pytest.fixture
def world(store_url: str):
    store = Store(store_url)
    yield World(store)
    store.close()


def children(n: int) -> list[str]:
    return [f"0RJCEA00HAU0AAG1C{i:07d}" for i in range(n)]


def test_a_produced_event_with_a_thousand_children_is_decoded_once_at_most(world, monkeypatch) -> None:
    decoded = []
    original = record.event_fields
    monkeypatch.setattr(record, "event_fields", lambda raw: decoded.append(1) or original(raw))
    maker = world.device("maker-1", "manufacturer")
    fields = {"code": PACK, "chemistry": "lfp", "rated_capacity_ah": 150, "rated_energy_kwh": 50}
    for i in range(3):
        world.send(maker, "produced", {**fields, "code": f"0RJPEA00HAU0AAG1C300012{i}", "children": children(1024)}, T0)
    assert len(decoded) == 0
    assert world.store.trace(children(1024)[1000])["state"] == "unknown"  # a child; produced names its pack


def test_a_recycled_battery_raises_each_after_end_of_life_finding_once(world) -> None:
    recycler = world.device("recycler-1", "recycler")
    gateway = world.device("gw-1", "gateway")
    world.send(recycler, "recycled", {"code": PACK, "mass_kg": 300, "materials": {"li": 5}}, T0)
    for i in range(30):
        world.send(gateway, "health", {"code": PACK, "health": {"soc_pct": 1}}, T0 + (i + 1) * 1000)
    result = world.send(gateway, "health", {"code": PACK, "health": {"soc_pct": 1}}, T0 + 99_000)
    assert result.findings == 1  # this batch's one event, not all 31 again
    assert len(world.store.findings(kind="after_end_of_life")) == 31


def test_an_event_in_order_takes_one_step_and_one_out_of_order_replays(world, monkeypatch) -> None:
    replays: list[str] = []
    original = record._lifecycle_facts
    monkeypatch.setattr(
        record, "_lifecycle_facts", lambda tx, sql, value: replays.append(value) or original(tx, sql, value)
    )
    station = world.device("station-1", "swap_operator")
    other = "0RJPEA00HAU0AAG1C3000999"

    def swap(i: int, at: int) -> None:
        out, into = (PACK, other) if i % 2 else (other, PACK)
        fields = {"vin": VIN, "code_out": out, "code_in": into, "slot_out": 1, "slot_in": 2}
        world.send(station, "swapped", fields | {"health_out": {"soc_pct": 20}, "health_in": {"soc_pct": 90}}, at)

    for i in range(60):  # a long history: each swap names both packs and the vehicle
        swap(i, T0 + i * 60_000)
    first = len(replays)
    swap(60, T0 + 60 * 60_000)  # in order: steps from the stored state, however long the history
    assert len(replays) == first
    station_late = world.device("station-2", "swap_operator")
    handed = {"code": PACK, "from_entity": "A", "to_entity": "B", "to_role": "maintenance"}
    world.send(station_late, "handed_over", handed, T0 + 30)
    assert replays[first:] == [PACK]  # an event from the past: that battery replays
    assert world.store.trace(PACK)["state"] == "in_vehicle"


def test_a_chain_with_a_hole_reads_its_tail_only_when_the_hole_is_filled(world, monkeypatch) -> None:
    statements: list[str] = []
    original = db.Tx.all
    monkeypatch.setattr(
        db.Tx, "all", lambda self, sql, params=(): statements.append(sql) or original(self, sql, params)
    )
    gateway = world.device("gw-1", "gateway")
    sealed = [gateway.seal("health", {"code": PACK, "health": {"soc_pct": i}}, T0 + i) for i in range(40)]
    for i, raw in enumerate(sealed):
        if i != 1:  # seq 2 is lost on the way
            world.deliver(gateway, raw, T0 + DAY)
    tail_reads = [sql for sql in statements if "e.seq > w.wm" in sql]
    assert tail_reads == []
    assert world.deliver(gateway, sealed[1], T0 + DAY).watermarks[gateway.key.public.kid].seq == 40
    assert len([sql for sql in statements if "e.seq > w.wm" in sql]) == 1


# -- the step and the replay agree ------------------------------------------------------------------------

CODES = ["0RJPEA00HAU0AAG1C3000001", "0RJPEA00HAU0AAG1C3000002", "0RJPEA00HAU0AAG1C3000003"]
VINS = ["LNBSCB3F1PW123456", "LNBSCB3F3PW654321"]


@st.composite
def lifecycle_event(draw: st.DrawFn) -> tuple[str, dict[str, Any], int]:
    kind = draw(st.sampled_from(["installed", "swapped", "replaced", "vehicle_scrapped", "handed_over", "recycled"]))
    code, other = draw(st.permutations(CODES))[:2]
    vin = draw(st.sampled_from(VINS))
    at = T0 + draw(st.integers(0, 50)) * 60_000
    fields: dict[str, Any] = {
        "installed": {"code": code, "vin": vin},
        "swapped": {"vin": vin, "code_out": code, "code_in": other, "slot_out": 1, "slot_in": 2,
                    "health_out": {"soc_pct": 1}, "health_in": {"soc_pct": 2}},
        "replaced": {"vin": vin, "code_out": code, "code_in": other},
        "vehicle_scrapped": {"vin": vin, "codes": draw(st.lists(st.sampled_from(CODES), unique=True, max_size=2))},
        "handed_over": {"code": code, "from_entity": "A", "to_entity": "B",
                        "to_role": draw(st.sampled_from(["recycler", "maintenance"]))},
        "recycled": {"code": code, "mass_kg": 1, "materials": {"li": 1}},
    }[kind]  # fmt: skip
    return kind, fields, at


ROLES = {"installed": "vehicle_maker", "swapped": "swap_operator", "replaced": "maintenance",
         "vehicle_scrapped": "scrapper", "handed_over": "recycler", "recycled": "recycler"}  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lifecycle_event(), min_size=1, max_size=14), st.data())
def test_stepping_in_arrival_order_ends_where_a_full_replay_does(store_url: str, events, data) -> None:
    store = Store(store_url)
    try:
        world = World(store)
        n = len(store.devices())
        devices = {role: world.device(f"{role.replace('_', '-')}-{n}", role) for role in set(ROLES.values())}
        # Every event is its own batch, in an arbitrary arrival order: some in order, some from the past.
        for i, (kind, fields, at) in enumerate(data.draw(st.permutations(events))):
            world.send(devices[ROLES[kind]], kind, fields, at + i, delay_ms=DAY)
        with store.db.reading() as tx:
            for code in CODES:
                row = tx.one(
                    "SELECT state, vin, place, out_of_service_ms, final_ms FROM batteries WHERE code = ?", (code,)
                )
                if row is None:
                    continue
                replayed, found = rules.replay_battery(
                    code, record._lifecycle_facts(tx, record._BATTERY_LIFECYCLE, code)
                )
                assert row == (
                    replayed.state,
                    replayed.vin,
                    replayed.place,
                    replayed.out_of_service_ms,
                    replayed.final_ms,
                )
                open_kinds = {
                    (f["kind"], f["event"]["kid"], f["event"]["seq"])
                    for f in store.findings(True, subject=rules.battery(code))
                    if f["kind"] in rules.REPLAYED_BATTERY_KINDS
                }
                assert open_kinds == {(f.kind, f.ref[0].hex(), f.ref[1]) for f in found}
            for vin in VINS:
                row = tx.one("SELECT state, batteries FROM vehicles WHERE vin = ?", (vin,))
                if row is None:
                    continue
                v, _ = rules.replay_vehicle(vin, record._lifecycle_facts(tx, record._VEHICLE_LIFECYCLE, vin))
                assert row[0] == v.state and set(json.loads(row[1])) == v.batteries
    finally:
        store.close()


# -- fairness between devices ---------------------------------------------------------------------------


def test_a_flooding_device_delays_only_itself(monkeypatch) -> None:
    """One device's backlog fills the collector's inbox; every other device's waiting message still
    goes into the next batch (each device present gets its share first, the rest fills in arrival
    order), and each device's own order is kept."""
    from battery_trace.server.intake import Inbox
    from battery_trace.server.mqtt_packets import Message

    inbox = Inbox()
    flood = [(0, Message("bt/v1/flooder/events", bytes([i % 256]) * 8, 1, i + 1)) for i in range(1900)]
    honest = [(0, Message(f"bt/v1/gw-{i}/events", b"h", 1, 5000 + i)) for i in range(40)]
    inbox.put(flood)
    inbox.put(honest)
    first = inbox.take(500, 0.1, 0.0)
    assert len(first) == 500
    assert all(item in first for item in honest)
    taken = [m.packet_id for _, m in first if m.topic == "bt/v1/flooder/events"]
    assert taken == list(range(1, 461))  # the flooder's share, still in its own order
    rest = inbox.take(2000, 0.1, 0.0)
    assert [m.packet_id for _, m in rest] == list(range(461, 1901))


def test_more_devices_waiting_than_a_batch_holds_are_each_served_in_turn() -> None:
    """600 devices, each with a backlog, and batches of 500: the 100 left out of one batch go first in
    the next, so no device waits behind the others' backlogs for ever."""
    from battery_trace.server.intake import Inbox
    from battery_trace.server.mqtt_packets import Message

    inbox = Inbox()
    for round_ in range(3):
        inbox.put([(0, Message(f"bt/v1/gw-{i}/events", b"x", 1, round_ * 1000 + i + 1)) for i in range(600)])
    first = {m.topic for _, m in inbox.take(500, 0.1, 0.0)}
    second = {m.topic for _, m in inbox.take(500, 0.1, 0.0)}
    assert {f"bt/v1/gw-{i}/events" for i in range(600)} <= first | second
    assert len(first) == 500 and {f"bt/v1/gw-{i}/events" for i in range(500, 600)} <= second
