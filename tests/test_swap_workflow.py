"""The swap-station workflow on its own: PLC commands and battery readings in, sealed swaps out.

Sources are separate serial ports, so their lines reach the agent in any order; these tests feed
the orders a real station produces and check that the sealed swap names the right batteries.
"""

from __future__ import annotations

import time

from battery_trace.agent.battery_view import BatteryView
from battery_trace.agent.decoders.station import StationCommand
from battery_trace.agent.readings import Health, Identity
from battery_trace.agent.sealer import Draft
from battery_trace.agent.workflows.swap_station import SwapStation

VIN = "LNBSCB3FXPW100001"
OLD, NEW, STOCK = (f"0RJPEA00HAU0AAG1C3000{n}" for n in (101, 102, 103))


def station() -> tuple[SwapStation, BatteryView, list[Draft]]:
    view = BatteryView()
    sealed: list[Draft] = []
    workflow = SwapStation(view, lambda d: sealed.append(d) or len(sealed), health_interval_s=3600)
    view.update(1, Identity("label", code=STOCK))
    view.update(1, Health(soc_pct=96.0))
    return workflow, view, sealed


def battery_arrives(view: BatteryView, slot: int, code: str, soc: float, ago_s: float = 0.0) -> None:
    at = time.time() - ago_s
    view.update(slot, Identity("label", code=code), at)
    view.update(slot, Health(soc_pct=soc), at)


def test_a_swap_names_the_battery_that_came_out_and_the_one_that_went_in() -> None:
    workflow, view, sealed = station()
    workflow.command(StationCommand("VEHICLE", vin=VIN))
    workflow.command(StationCommand("OUT", slot=2))
    battery_arrives(view, 2, NEW, 18.0)
    workflow.command(StationCommand("IN", slot=1))
    workflow.command(StationCommand("DONE"))
    (swap,) = [d for d in sealed if d.type == "swapped"]
    assert swap.fields["code_out"] == NEW and swap.fields["code_in"] == STOCK
    assert swap.fields["health_out"] == {"soc_pct": 18.0} and swap.fields["health_in"] == {"soc_pct": 96.0}


def test_the_battery_read_before_the_plc_lines_are_handled_still_counts() -> None:
    """The battery from the vehicle is read in its slot before the PLC's OUT, even before its VEHICLE,
    is handled: the sources are separate ports."""
    workflow, view, sealed = station()
    battery_arrives(view, 2, NEW, 18.0, ago_s=0.5)
    workflow.command(StationCommand("VEHICLE", vin=VIN))
    workflow.command(StationCommand("OUT", slot=2))
    workflow.command(StationCommand("IN", slot=1))
    workflow.command(StationCommand("DONE"))
    (swap,) = [d for d in sealed if d.type == "swapped"]
    assert swap.fields["code_out"] == NEW


def test_what_a_slot_knew_before_the_vehicle_came_is_forgotten() -> None:
    """A stale identity on the OUT slot (its battery left silently) never becomes the removed battery."""
    workflow, view, sealed = station()
    battery_arrives(view, 2, OLD, 50.0, ago_s=20)  # an earlier battery, gone without the agent noticing yet
    workflow.command(StationCommand("VEHICLE", vin=VIN))
    workflow.command(StationCommand("OUT", slot=2))
    workflow.command(StationCommand("IN", slot=1))
    workflow.command(StationCommand("DONE"))
    assert [d for d in sealed if d.type == "swapped"] == []  # waits for the real battery to speak
    battery_arrives(view, 2, NEW, 18.0)
    workflow.tick(0.0)
    (swap,) = [d for d in sealed if d.type == "swapped"]
    assert swap.fields["code_out"] == NEW


def test_the_bay_shows_the_swap_in_progress() -> None:
    workflow, _, _ = station()
    assert workflow.bay() == {"vehicle": None, "slot_out": None, "slot_in": None, "finishing": 0}
    workflow.command(StationCommand("VEHICLE", vin=VIN))
    workflow.command(StationCommand("OUT", slot=2))
    assert workflow.bay() == {"vehicle": VIN, "slot_out": 2, "slot_in": None, "finishing": 0}
    workflow.command(StationCommand("IN", slot=1))
    workflow.command(StationCommand("DONE"))
    assert workflow.bay() == {"vehicle": None, "slot_out": None, "slot_in": None, "finishing": 1}
