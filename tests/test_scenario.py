"""Scenario validation: every error names file, key path and expectation."""
from __future__ import annotations

import copy
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedkd.errors import ScenarioError
from fedkd.scenario import parse_scenario
from fedkd.checks import load_scenario

from .conftest import TINY


def error_of(write_scenario, content) -> str:
    path = write_scenario(content)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    message = str(exc.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    return message


def test_valid_scenario_loads(write_scenario, tiny_scenario):
    scenario = load_scenario(write_scenario(tiny_scenario))
    assert scenario.population.devices == 12
    assert [s.run_label for s in scenario.strategies] == ["fedavg", "fedprox"]


def test_unknown_key_is_named_with_its_path(write_scenario, tiny_scenario):
    tiny_scenario["population"]["classes"][1]["uplink_kbps"] = 5
    assert "population.classes[1].uplink_kbps: unknown key" in error_of(write_scenario, tiny_scenario)


def test_negative_bandwidth_is_rejected(write_scenario, tiny_scenario):
    tiny_scenario["population"]["classes"][0]["uplink_bps"] = -1
    message = error_of(write_scenario, tiny_scenario)
    assert "population.classes[0].uplink_bps" in message and "greater than 0" in message


def test_zero_devices_is_rejected(write_scenario, tiny_scenario):
    tiny_scenario["population"]["devices"] = 0
    assert "population.devices" in error_of(write_scenario, tiny_scenario)


def test_wrong_type_is_rejected(write_scenario, tiny_scenario):
    tiny_scenario["rounds"] = "many"
    assert "rounds: " in error_of(write_scenario, tiny_scenario)


def test_missing_required_key(write_scenario, tiny_scenario):
    del tiny_scenario["population"]
    assert "population: required key is missing" in error_of(write_scenario, tiny_scenario)


def test_shares_must_sum_to_one(write_scenario, tiny_scenario):
    tiny_scenario["population"]["classes"][0]["share"] = 0.7
    assert "shares must sum to 1" in error_of(write_scenario, tiny_scenario)


def test_malformed_yaml_names_the_line(write_scenario):
    assert "line 3, column 5: malformed YAML" in error_of(write_scenario, "name: x\nrounds: [1, 2\nseed: 3\n")


def test_missing_file(tmp_path):
    with pytest.raises(ScenarioError, match="file not found"):
        load_scenario(tmp_path / "nope.yaml")


def test_alias_bomb_is_refused_quickly(write_scenario):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]"
              for i in range(1, 10)]
    started = time.perf_counter()
    assert "expand past" in error_of(write_scenario, "\n".join(lines) + "\n")
    assert time.perf_counter() - started < 2.0


def test_unknown_strategy(write_scenario, tiny_scenario):
    tiny_scenario["strategies"] = ["fedavgg"]
    assert "strategies[0].name: unknown strategy 'fedavgg'" in error_of(write_scenario, tiny_scenario)


def test_unknown_strategy_param(write_scenario, tiny_scenario):
    tiny_scenario["strategies"][1]["params"]["mu"] = 0.1
    assert "strategies[1].params" in error_of(write_scenario, tiny_scenario)


def test_unknown_dataset_option(write_scenario, tiny_scenario):
    tiny_scenario["data"]["options"]["imagesize"] = 14
    assert "data.options.imagesize: unknown option" in error_of(write_scenario, tiny_scenario)


def test_unknown_modality(write_scenario, tiny_scenario):
    tiny_scenario["population"]["classes"][0]["modalities"] = ["lidar"]
    assert "population.classes[0].modalities: unknown modality 'lidar'" in error_of(write_scenario, tiny_scenario)


def test_weight_averaging_refuses_mixed_architectures(write_scenario, tiny_scenario):
    tiny_scenario["population"]["classes"][0]["model_tier"] = "tiny"
    tiny_scenario["population"]["classes"][1]["model_tier"] = "base"
    assert "one architecture" in error_of(write_scenario, tiny_scenario)


def test_unused_strategy_default_is_a_typo(write_scenario, tiny_scenario):
    tiny_scenario["strategy_defaults"]["fraction_trian"] = 0.5
    assert "strategy_defaults.fraction_trian" in error_of(write_scenario, tiny_scenario)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(["rounds", "seed", "population", "data", "world", "training", "strategies", "name"]),
       value=json_values)
def test_validator_never_crashes_on_arbitrary_values(key, value):
    scenario = copy.deepcopy(TINY)
    scenario[key] = value
    try:
        parse_scenario(scenario, "x.yaml")
    except ScenarioError as exc:
        assert str(exc).startswith("x.yaml: ")


@pytest.mark.parametrize("address, head", [("10.0.0.5:6379", ("10.0.0.5", 6379)), ("ray://head:10001", ("head", 10001)),
                                           ("[::1]:6379", ("::1", 6379)), ("head", None), ("head:0", None),
                                           ("head:port", None), (":6379", None)])
def test_a_ray_address_is_host_and_port(address, head):
    from fedkd.scenario import ray_head

    assert ray_head(address) == head
