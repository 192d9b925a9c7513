"""Architectures when devices differ: the population census, by hand."""
from __future__ import annotations

import collections
import copy

import pytest

from fedkd.architectures import Architecture, population_architectures
from fedkd.context import SimulationContext
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
