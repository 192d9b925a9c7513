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


def _ra_scenario(tiny_scenario, **params):
    tiny_scenario["topology"] = {"fogs": 2, "assign": "hash"}
    tiny_scenario["strategy_defaults"] = {}
    tiny_scenario["strategies"] = [{"name": "ra_cmkd", "params": {"fraction_train": 0.5, "public_batch": 16,
                                                                  "allocator": "all_in", **params}}]
    return tiny_scenario


def test_devices_download_their_fogs_model_and_are_scored_on_it(write_scenario, tiny_scenario, tmp_path):
    from fedkd.runtime.context import SimulationContext
    from fedkd.scenario import Scenario

    scenario = _ra_scenario(tiny_scenario)
    out16, out32 = tmp_path / "fp16", tmp_path / "fp32"
    assert main(["simulate", str(write_scenario(scenario)), "--out", str(out16)]) == 0
    scenario["strategies"][0]["params"]["model_downlink"] = "fp32"
    assert main(["simulate", str(write_scenario(scenario, "fp32.yaml")), "--out", str(out32)]) == 0
    ctx = SimulationContext(Scenario.model_validate(scenario))
    params = {m: sum(p.numel() for p in ctx.new_model("small", modalities=(m,)).parameters())
              for m in ("audio", "image")}
    down16, down32 = (pd.read_csv(o / "devices.csv") for o in (out16, out32))
    for cls, modality in (("phone", "audio"), ("camera", "image")):
        mine16 = down16[down16["device_class"] == cls]["bytes_down"]
        mine32 = down32[down32["device_class"] == cls]["bytes_down"]
        # Every task carries the model: 2 bytes a parameter in fp16, 4 in fp32, plus the config.
        assert (mine16 > 2 * params[modality]).all() and (mine16 < 3 * params[modality]).all()
        assert (mine32 - mine16.values > 1.9 * params[modality]).all()
    rounds = pd.read_csv(out16 / "rounds.csv")
    # Scored on the fog models: every architecture in every fog, round 0 included.
    assert {"accuracy_fog_min", "accuracy_fog_max", "accuracy_arch_small_audio"} <= set(rounds.columns)
    assert "evaluated_devices" not in rounds.columns


def test_without_fog_models_devices_keep_their_own(write_scenario, tiny_scenario, tmp_path):
    scenario = _ra_scenario(tiny_scenario, fog_models=False, distill_epochs=1)
    out = tmp_path / "own"
    assert main(["simulate", str(write_scenario(scenario)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    # Scored on a panel of the devices' own models; no model travels down.
    assert "evaluated_devices" in rounds.columns and "accuracy_fog_min" not in rounds.columns
    assert pd.read_csv(out / "devices.csv")["bytes_down"].max() < 2000
