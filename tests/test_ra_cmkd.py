"""ra_cmkd end to end on a tiny scenario: plans, fogs, backhaul."""
from __future__ import annotations

import numpy as np
import pandas as pd

from fedkd.contract import StrategyEnv
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


def _ra_scenario(tiny_scenario, name="ra_cmkd", **params):
    tiny_scenario["topology"] = {"fogs": 2, "assign": "hash"}
    tiny_scenario["strategy_defaults"] = {}
    tiny_scenario["strategies"] = [{"name": name, "params": {"fraction_train": 0.5, "public_batch": 16,
                                                                  "allocator": "all_in", **params}}]
    return tiny_scenario


def test_devices_download_their_fogs_model_and_are_scored_on_it(write_scenario, tiny_scenario, tmp_path):
    from fedkd.context import SimulationContext
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
    # Scored by the panel on the fog models: per fog and per architecture, round 0 included.
    assert {"accuracy_fog_min", "accuracy_fog_max", "accuracy_arch_small_audio"} <= set(rounds.columns)
    assert rounds["accuracy_fog_min"].notna().all()


def test_without_fog_models_devices_keep_their_own(write_scenario, tiny_scenario, tmp_path):
    scenario = _ra_scenario(tiny_scenario, "ra_cmkd_targets", distill_epochs=1)
    out = tmp_path / "own"
    assert main(["simulate", str(write_scenario(scenario)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    # Scored on the panel devices' own models; no model travels down.
    assert (rounds["evaluated_devices"] == 12).all()
    assert pd.read_csv(out / "devices.csv")["bytes_down"].max() < 2000


def _fake_reply(device: int, logits, examples: float = 10.0):
    """What aggregate_train reads of a reply: sender, encoded logits, metrics."""
    from types import SimpleNamespace

    from fedkd.codecs import get_codec

    content = {"logits": {"payload": get_codec("fp32").encode(np.asarray(logits, dtype=np.float32))},
               "metrics": {"num-examples": examples, "train-loss": 0.5}}
    return SimpleNamespace(has_error=lambda: False, metadata=SimpleNamespace(src_node_id=device), content=content)


def _two_fog_strategy(bank_samples: int):
    """ra_cmkd with fog targets only (no fog models), two camera devices, one in each fog."""
    from fedkd.logit_exchange import PublicSet
    from fedkd.architectures import Architecture
    from fedkd.sim.grid import NodeProfile
    from fedkd.strategies.ra_cmkd import FogTargetsKD

    strategy = FogTargetsKD(allocator="all_in", bank_samples=bank_samples)
    strategy.fedkd_setup(StrategyEnv(public=PublicSet(size=12, num_classes=2, seed=0)))
    camera = Architecture("small", ("camera",))
    strategy._archs = {1: camera, 2: camera}
    strategy._profiles = {1: NodeProfile(1, "cam", "small", ("camera",), fog=0),
                          2: NodeProfile(2, "cam", "small", ("camera",), fog=1)}
    return strategy


def test_a_silent_fog_files_nothing_new_in_its_bank():
    # Prepare: round 1 asks public samples 0-3 and both fogs hear a device; round 2 asks 4-7
    # and only fog 0 does.
    strategy = _two_fog_strategy(bank_samples=256)
    strategy._asked_indices = np.arange(0, 4)
    strategy.aggregate_train(1, [_fake_reply(1, np.zeros((4, 2))), _fake_reply(2, np.ones((4, 2)))])
    strategy._asked_indices = np.arange(4, 8)

    # Execute
    strategy.aggregate_train(2, [_fake_reply(1, np.zeros((4, 2)))])

    # Assert: fog 1's bank holds rows for samples 0-3 only (the old code filed its round-1
    # targets again at samples 4-7, which it never saw); fog 0's for 0-7.
    filled = {fog: np.flatnonzero(~np.isnan(bank["camera"][:, 0])).tolist()
              for fog, bank in strategy.fog_bank.items()}
    assert filled == {0: list(range(8)), 1: [0, 1, 2, 3]}
    indices, _ = strategy._targets_for(1, "camera", 3)
    assert indices.tolist() == [0, 1, 2, 3]


def test_latest_targets_path_pairs_a_silent_fogs_targets_with_their_own_samples():
    # Prepare: as above, with bank_samples = 0 (only the latest targets, as in FedMD).
    strategy = _two_fog_strategy(bank_samples=0)
    strategy._asked_indices = np.arange(0, 4)
    strategy.aggregate_train(1, [_fake_reply(1, np.zeros((4, 2))), _fake_reply(2, np.ones((4, 2)))])
    round1_fog1 = strategy.fog_targets[1]["camera"].copy()
    strategy._asked_indices = np.arange(4, 8)

    # Execute
    strategy.aggregate_train(2, [_fake_reply(1, np.zeros((4, 2)))])
    indices, targets = strategy._targets_for(1, "camera", 3)

    # Assert: fog 1's round-1 targets, still about samples 0-3 (the old code said 4-7).
    assert indices.tolist() == [0, 1, 2, 3]
    assert np.array_equal(targets, round1_fog1)
    assert strategy._targets_for(0, "camera", 3)[0].tolist() == [4, 5, 6, 7]
