"""Architectures when devices differ: the population census and per-architecture scoring, by hand."""
from __future__ import annotations

import collections
import copy

import numpy as np
import pytest
import torch

from fedkd.runtime.architectures import (Architecture, new_model, population_architectures,
                                         score_architectures)
from fedkd.runtime.context import SimulationContext
from fedkd.scenario import parse_scenario

from .conftest import TINY


def context(mix: bool = False) -> SimulationContext:
    scenario = copy.deepcopy(TINY)
    scenario["population"]["classes"][0]["model_tier"] = "tiny"
    if mix:  # phones draw their sensors; cameras keep their own
        del scenario["population"]["classes"][0]["modalities"]
        scenario["data"]["partition"]["modality_mix"] = {"audio": 0.5, "image": 0.3, "audio+image": 0.2}
    return SimulationContext(parse_scenario(scenario))


@pytest.mark.parametrize("mix", [False, True])
def test_census_agrees_with_each_devices_own_view(mix):
    ctx = context(mix)
    one_by_one = collections.Counter(Architecture(ctx.device(d).model_tier, ctx.modalities_of(d))
                                     for d in range(ctx.population.size))
    census = population_architectures(ctx)
    assert census == dict(one_by_one) and sum(census.values()) == 12
    if mix:  # a mixed-sensor phone is its own architecture, with both encoders
        assert Architecture("tiny", ("audio", "image")) in census


def constant_model(ctx: SimulationContext, arch: Architecture, label: int):
    """A model of ``arch`` that predicts ``label`` for every input (weights 0, head bias one-hot)."""
    model = new_model(ctx, arch)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias[label] = 1.0
    return model


def test_headline_accuracy_weighs_architectures_by_their_devices():
    # Prepare: tiny audio always says 0, small image always says 1; 3 and 1 devices run them.
    ctx = context()
    audio, image = Architecture("tiny", ("audio",)), Architecture("small", ("image",))
    models = {audio: constant_model(ctx, audio, 0), image: constant_model(ctx, image, 1)}
    share = np.bincount(ctx.test_split.labels, minlength=10) / len(ctx.test_split)
    # Execute
    accuracy, metrics = score_architectures(ctx, models, {audio: 3, image: 1})
    # Assert: each model scores the share of its class; the headline is (3 a + 1 b) / 4.
    assert metrics["accuracy_arch_tiny_audio"] == pytest.approx(share[0])
    assert metrics["accuracy_arch_small_image"] == pytest.approx(share[1])
    assert accuracy == pytest.approx((3 * share[0] + share[1]) / 4)
    assert metrics["accuracy_tier_tiny"] == metrics["accuracy_audio_devices"] == pytest.approx(share[0])
    assert metrics["accuracy_min"] == pytest.approx(min(share[0], share[1]))
