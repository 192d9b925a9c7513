"""ra_cmkd end to end on a tiny scenario: plans, fogs, backhaul."""
from __future__ import annotations

import pandas as pd

from fedkd.cli import main


def test_ra_cmkd_runs_through_fogs_and_leaves_drained_devices_out(write_scenario, tiny_scenario, tmp_path):
    tiny_scenario["topology"] = {"fogs": 2, "assign": "hash"}
    tiny_scenario["rounds"] = 3
    # Phones hold 1 J, less than any plan needs above a 90 % reserve: none may take part.
    tiny_scenario["population"]["classes"][0].update(battery_j=1.0, energy_per_flop_j=1e-6)
    tiny_scenario["strategy_defaults"] = {}
    tiny_scenario["strategies"] = [{"name": "ra_cmkd", "params": {
        "fraction_train": 1.0, "public_batch": 32, "allocator": "resource_aware",
        "allocator_params": {"battery_reserve": 0.9}}}]
    out = tmp_path / "ra"
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    trained = rounds[rounds["round"] > 0]
    assert (trained["participants"] > 0).all()
    assert (trained["backhaul_bytes"] > 0).all()
    devices = pd.read_csv(out / "devices.csv")
    assert set(devices["device_class"]) == {"camera"}  # the phones sat every round out
    assert set(devices["status"]) == {"ok"}  # and nobody failed for lack of time or charge
