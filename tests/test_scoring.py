"""The one scoring protocol (fedkd.scoring): the panel, and scores worked out by hand."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedkd.device_models import model_key, pack
from fedkd.architectures import Architecture, new_model
from fedkd.context import SimulationContext
from fedkd.scenario import parse_scenario
from fedkd.scoring import PanelModel, evaluation_panel, own_model, panel_counts, score_panel

from .conftest import TINY


def context(**changes) -> SimulationContext:
    scenario = copy.deepcopy(TINY)
    scenario.update(changes)
    return SimulationContext(parse_scenario(scenario))


@pytest.mark.parametrize("sizes, size, expected", [
    # 64 of 35/50/15: exact 22.4, 32, 9.6 -> floors 22, 32, 9 (63); the largest remainder (0.6) gets the last.
    ([35, 50, 15], 64, [22, 32, 10]),
    # 10 of 1/99: exact 0.1, 9.9 -> floors 0, 9; every class gets one -> 1, 9.
    ([1, 99], 10, [1, 9]),
    # 2 of 1/1/98: too few for one each; exact .02, .02, 1.96 -> floors 0, 0, 1, remainder .96 -> 0, 0, 2.
    ([1, 1, 98], 2, [0, 0, 2]),
    # A panel at least the population's size takes every device.
    ([3, 4], 64, [3, 4]),
])
def test_panel_counts_are_proportional_by_hand(sizes, size, expected):
    assert panel_counts(np.array(sizes), size).tolist() == expected


def test_panel_is_fixed_by_the_seed_stratified_and_whole_when_small():
    ctx = context()
    # 12 devices, panel of 64: the whole population.
    assert [d.device_id for d in evaluation_panel(ctx)] == list(range(12))
    # A panel of 4 from 6 phones and 6 cameras: 2 of each, the same draw every time.
    four = evaluation_panel(ctx, 4)
    assert [d.device_id for d in four] == [d.device_id for d in evaluation_panel(ctx, 4)]
    assert sorted(d.device_class for d in four) == ["camera", "camera", "phone", "phone"]
    other = [d.device_id for d in evaluation_panel(context(seed=4), 4)]
    assert [d.device_id for d in evaluation_panel(context(seed=5), 4)] != other or other == []


def constant_model(ctx: SimulationContext, arch: Architecture, label: int, seed_model=None):
    """A model of ``arch`` that predicts ``label`` for every input (weights 0, head bias one-hot)."""
    model = seed_model if seed_model is not None else new_model(ctx, arch)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias[label] = 1.0
    return model


def test_panel_score_is_the_mean_over_devices_each_with_its_own_model():
    # Prepare: phones (audio) always say 0, cameras (image) always say 1; p phones, c cameras.
    ctx = context()
    panel = evaluation_panel(ctx)
    share = np.bincount(ctx.test_split.labels, minlength=10) / len(ctx.test_split)
    models = {("audio",): constant_model(ctx, Architecture("small", ("audio",)), 0),
              ("image",): constant_model(ctx, Architecture("small", ("image",)), 1)}
    phones = [d.device_id for d in panel if d.device_class == "phone"]
    p, c = len(phones), len(panel) - len(phones)

    # Execute: only the first phone has trained.
    accuracy, metrics = score_panel(ctx, panel, lambda d: PanelModel(d.modalities, lambda: models[d.modalities]),
                                    trained=[phones[0]])

    # Assert: the panel mean is (p share0 + c share1) / 12; participants = that phone's share0.
    assert accuracy == pytest.approx((p * share[0] + c * share[1]) / 12)
    assert metrics["accuracy_participants"] == pytest.approx(share[0])
    assert metrics["panel_participants"] == 1
    assert metrics["accuracy_audio_devices"] == metrics["accuracy_class_phone"] == pytest.approx(share[0])
    assert metrics["accuracy_image_devices"] == metrics["accuracy_class_camera"] == pytest.approx(share[1])
    assert metrics["accuracy_min"] == pytest.approx(min(share[0], share[1]))
    assert metrics["evaluated_devices"] == 12


def test_a_device_is_scored_with_the_model_it_runs_never_the_best_on_test():
    # Prepare: phone 0 holds its registered model (small audio) saying class a, and a tiny
    # model it trained once for an allocator saying class b, which is right more often on test.
    ctx = context()
    device = next(d for d in evaluation_panel(ctx) if d.device_class == "phone")
    share = np.bincount(ctx.test_split.labels, minlength=10) / len(ctx.test_split)
    worse, better = int(np.argsort(share)[0]), int(np.argsort(share)[-1])
    registered = constant_model(ctx, Architecture("small", ("audio",)), worse)
    other = constant_model(ctx, Architecture("tiny", ("audio",)), better,
                           ctx.new_model("tiny", modalities=("audio",)))
    state = pack(None, model_key("small", ("audio",)), registered.state_dict())
    state = pack(state, model_key("tiny", ("audio",)), other.state_dict())

    # Execute
    accuracy, _ = score_panel(ctx, [device], lambda d: own_model(ctx, d, {device.device_id: state}))

    # Assert: the registered model's accuracy, not the better one's (the old code kept the best on test).
    assert accuracy == pytest.approx(share[worse]) and share[worse] < share[better]


def test_a_device_that_never_trained_is_scored_with_its_initial_model():
    ctx = context()
    device = evaluation_panel(ctx)[0]
    choice = own_model(ctx, device, {})
    fresh = ctx.new_model(device.model_tier, modalities=device.modalities,
                          seed=__import__("fedkd.seeding", fromlist=["derive_seed"]).derive_seed(
                              ctx.scenario.seed, "device-model", device.device_id,
                              model_key(device.model_tier, device.modalities)))
    built = choice.build()
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), fresh.state_dict().values()))
