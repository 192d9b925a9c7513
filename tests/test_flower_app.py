"""`flwr run`'s apps run one seed, the same on the server and the clients."""
from __future__ import annotations

import pytest

from fedkd.errors import FedkdError
from fedkd.flower_app import _scenario


def test_a_scenario_listing_one_seed_runs_that_seed(write_scenario, tiny_scenario):
    tiny_scenario["seeds"] = [5]

    scenario = _scenario(str(write_scenario(tiny_scenario, "one.yaml")))

    assert scenario.seed == 5 and scenario.seeds is None


def test_a_scenario_listing_several_seeds_is_refused_not_run_on_another(write_scenario, tiny_scenario):
    tiny_scenario["seeds"] = [0, 1]
    path = write_scenario(tiny_scenario, "several.yaml")

    with pytest.raises(FedkdError, match=r"seeds: flwr run runs one seed, and this scenario lists \[0, 1\]"):
        _scenario(str(path))
