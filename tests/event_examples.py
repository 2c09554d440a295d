"""One valid set of fields for every event type, for tests that need realistic events."""

from battery_trace.protocol import events

PACK = "0RJPEA00HAU0AAG1C3000123"
PACK_2 = "0RJPEA00HAU0AAG1C3000124"
MODULE = "0RJMEA00HAU0AAG1C3000200"
SECOND_LIFE = "0RJPBA0G1C3000123"
VIN = "LNBSCB3F1PW123456"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HEALTH = {"voltage_v": 352.6, "current_a": -120.5, "soc_pct": 63, "cells_v": [3.41, 3.4], "temps_c": [31, 27]}

FIELDS = {
    "produced": {
        "code": PACK,
        "chemistry": "ncm",
        "rated_capacity_ah": 150.0,
        "rated_energy_kwh": 52.5,
        "children": [MODULE],
    },
    "installed": {"code": PACK, "vin": VIN},
    "sold": {"vin": VIN, "buyer_kind": "individual"},
    "swapped": {
        "vin": VIN,
        "code_out": PACK,
        "code_in": PACK_2,
        "health_out": HEALTH,
        "health_in": {"soc_pct": 98},
        "slot_out": 3,
        "slot_in": 7,
    },
    "health": {"code": PACK, "health": HEALTH, "slot": 2},
    "maintenance": {"code": PACK, "action": "rebalance", "findings": "cell 12 low"},
    "replaced": {"vin": VIN, "code_out": PACK, "code_in": PACK_2},
    "vehicle_scrapped": {"vin": VIN, "codes": [PACK]},
    "handed_over": {
        "code": PACK,
        "from_entity": "Scrapper Co",
        "to_entity": "Recycler Co",
        "to_role": "recycler",
    },
    "repurposed": {"code": PACK, "new_code": SECOND_LIFE, "application": "grid storage"},
    "recycled": {"code": PACK, "mass_kg": 310.0, "materials": {"li": 4.2, "co": 3.1, "ni": 22.0, "mn": 3.0}},
}


def event(event_type: str = "health", seq: int = 1, prev: bytes = events.ZERO_HASH, **overrides) -> events.Event:
    fields = {**FIELDS[event_type], **overrides}
    return events.Event("station-1", seq, prev, T0 + seq * 1000, event_type, "label", fields)
