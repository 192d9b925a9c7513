"""The allocator extension point: plans, their checks, and the lookup by name."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedkd.allocator import AllIn, Allocator, DevicePlan, plans_for
from fedkd.errors import FedkdError
from fedkd.registry import registered_allocators, resolve_allocator

TELEMETRY = SimpleNamespace(battery_j=np.array([10.0, np.inf, 300.0]), uplink_bps=np.array([1e5, 1e7, 5e4]),
                            compute_flops=np.array([1e9, 4e9, 5e7]))


def test_all_in_plans_every_candidate_with_the_scenario_settings():
    plans = plans_for(AllIn(), 1, [2, 0], TELEMETRY)

    assert plans == {2: DevicePlan(), 0: DevicePlan()}
    assert plans[0] == DevicePlan(take_part=True, modality=None, model_tier=None, local_epochs=None, codec="fp32")


def test_builtin_allocator_resolves_by_name():
    ref = resolve_allocator("all_in")

    assert ref.cls is AllIn and ref.description == "Every candidate takes part, with the scenario's settings."
    assert list(registered_allocators()) == ["all_in", "resource_aware"]


@pytest.mark.parametrize("name, message", [
    ("fedavg", "unknown allocator 'fedavg'; expected one of ['all_in', 'resource_aware']"),
    ("fedkd.strategies.fedavg:FedAvg", "is not an allocator (a subclass of fedkd.allocator.Allocator)"),
    ("fedkd.allocator:Allocator", "is abstract: it does not implement allocate"),
])
def test_a_name_that_is_not_an_allocator_is_one_line(name, message):
    with pytest.raises(FedkdError) as caught:
        resolve_allocator(name)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("fields, message", [
    ({"codec": "int4"}, "unknown codec spec 'int4'"),
    ({"local_epochs": 0}, "local_epochs must be a positive integer or None, got 0"),
    ({"local_epochs": 1.5}, "got 1.5"),
])
def test_a_plan_with_an_impossible_setting_is_refused(fields, message):
    with pytest.raises(FedkdError, match=message):
        DevicePlan(**fields)


def test_a_plan_takes_numpy_integers_and_topk_codecs():
    assert DevicePlan(local_epochs=np.int64(2), codec="topk:3").local_epochs == 2


class Careless(Allocator):
    def __init__(self, answer):
        self.answer = answer

    def allocate(self, server_round, device_ids, telemetry):
        return self.answer


@pytest.mark.parametrize("answer, message", [
    ({0: DevicePlan()}, r"planned the wrong devices in round 4: missing \[1\], not candidates \[\]"),
    ({0: DevicePlan(), 1: DevicePlan(), 7: DevicePlan()}, r"missing \[\], not candidates \[7\]"),
    ({0: DevicePlan(), 1: True}, "gave device 1 a bool, not a DevicePlan"),
    ([DevicePlan(), DevicePlan()], "returned list; expected a mapping"),
])
def test_plans_for_refuses_an_answer_that_does_not_fit_the_candidates(answer, message):
    with pytest.raises(FedkdError, match=message):
        plans_for(Careless(answer), 4, [0, 1], TELEMETRY)


def test_telemetry_without_the_report_fields_an_allocator_needs_is_refused_in_one_line():
    with pytest.raises(FedkdError, match=r"telemetry SimpleNamespace is not usable by an allocator: .*compute_flops"):
        plans_for(AllIn(), 1, [0], SimpleNamespace(battery_j=np.ones(1), uplink_bps=np.ones(1)))


def test_no_telemetry_stays_none():
    seen = []

    class Record(Allocator):
        def allocate(self, server_round, device_ids, telemetry):
            seen.append(telemetry)
            return {d: DevicePlan() for d in device_ids}

    plans_for(Record(), 1, [0], None)
    assert seen == [None]
