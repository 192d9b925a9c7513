"""The centralized reference: no device is asked, the pooled train split trains one model per architecture."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd

from fedkd.contract import StrategyEnv
from fedkd.cli import main
from fedkd.report import REFERENCE_STRATEGIES, _plot
from fedkd.architectures import Architecture, new_model
from fedkd.threads import single_threaded
from fedkd.context import SimulationContext
from fedkd.scenario import parse_scenario
from fedkd.seeding import derive_seed
from fedkd.training import train_local
from fedkd.strategies.centralized import Centralized

from .conftest import TINY


def test_one_round_is_local_training_on_the_whole_train_split_per_architecture():
    # Prepare
    ctx = SimulationContext(parse_scenario(copy.deepcopy(TINY)))
    strategy = Centralized(local_epochs=1)
    strategy.fedkd_setup(StrategyEnv.of(ctx))
    audio = Architecture("small", ("audio",))
    expected = new_model(ctx, audio)
    with single_threaded():
        train_local(expected, ctx.dataset.split("train"), ("audio",), epochs=1, batch_size=10,
                    learning_rate=ctx.scenario.training.learning_rate,
                    seed=derive_seed(ctx.scenario.seed, "centralized", 1, audio.key))
    # Execute
    messages = strategy.configure_train(1, None, None, grid=None)
    _, metrics = strategy.aggregate_train(1, [])
    # Assert: no message; every train sample used; the same weights as training by hand.
    assert list(messages) == []
    assert metrics["num-examples"] == len(ctx.dataset.split("train")) == 1800
    for name, value in expected.state_dict().items():
        assert np.array_equal(strategy.models[audio].state_dict()[name].numpy(), value.numpy())


def test_centralized_moves_nothing_and_plots_as_a_reference_line(write_scenario, tmp_path):
    scenario = copy.deepcopy(TINY)
    scenario["population"]["classes"][0]["model_tier"] = "tiny"  # mixed tiers are fine
    scenario["strategies"], scenario["strategy_defaults"] = ["centralized"], {}
    assert main(["simulate", str(write_scenario(scenario)), "--out", str(tmp_path / "c")]) == 0
    rounds = pd.read_csv(tmp_path / "c" / "rounds.csv")
    assert (rounds[["sim_time_s", "bytes_up", "bytes_down", "energy_j", "participants"]] == 0).all().all()
    assert rounds["accuracy"].iloc[-1] > 0.5  # pooled data learn; chance is 0.1
    assert {"accuracy_arch_tiny_audio", "accuracy_arch_small_image"} <= set(rounds.columns)
    assert "centralized" in REFERENCE_STRATEGIES


def test_a_reference_is_drawn_as_a_dashed_line_at_its_final_accuracy(monkeypatch):
    drawn = {}
    import matplotlib.axes

    def axhline(self, y, **kwargs):
        drawn["y"], drawn["style"], drawn["label"] = y, kwargs.get("linestyle"), kwargs.get("label")

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", axhline)
    rounds = pd.DataFrame({"strategy": ["fedavg", "fedavg", "pooled", "pooled"], "sim_time_s": [0, 5, 0, 0],
                           "accuracy": [0.1, 0.4, 0.1, 0.9]})
    assert _plot(rounds, "sim_time_s", "time", "t", frozenset({"pooled"}))[:4] == b"\x89PNG"
    assert drawn == {"y": 0.9, "style": "--", "label": "pooled (reference)"}
