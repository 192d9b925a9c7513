"""Label budgets: one labelled order of the public split, what each strategy reads of it,
and the warm start that gives weight-sharing baselines the same labels."""
from __future__ import annotations

import copy

import numpy as np

from fedkd.contract import StrategyEnv
from fedkd.labels import labelled_public, unlabelled_public
from fedkd.runtime.backends import run_backend
from fedkd.runtime.client import make_client_app
from fedkd.context import SimulationContext
from fedkd.runtime.server import StrategyJob, make_server_app
from fedkd.scenario import parse_scenario

from .conftest import TINY


def test_a_smaller_budget_reads_a_subset_and_the_rest_is_unlabelled():
    small, large = labelled_public(0, 100, 10), labelled_public(0, 100, 30)
    assert len(small) == 10 and len(large) == 30 and set(small) <= set(large)
    rest = unlabelled_public(0, 100, 30)
    assert sorted(set(large) | set(rest)) == list(range(100)) and not set(large) & set(rest)
    assert len(labelled_public(0, 5, 30)) == 5  # never more than the split


def _run(scenario: dict):
    parsed = parse_scenario(scenario, "labels.yaml")
    sink = []
    run_backend(parsed.backend, make_server_app(StrategyJob(parsed, parsed.strategies[0]), sink),
                make_client_app(parsed))
    return sink[0]


def test_warm_start_trains_the_initial_global_model_on_the_labelled_samples_and_reports_them():
    # Prepare: FedAvg with and without a warm start on 40 labelled public samples.
    scenario = copy.deepcopy(TINY)
    scenario["rounds"] = 1
    scenario["strategies"] = ["fedavg"]
    cold = _run(scenario)
    scenario["training"]["warm_start"] = {"labelled_samples": 40, "epochs": 3}
    # Execute
    warm = _run(scenario)
    # Assert: it read those 40 labels and nothing else; round 0 scores a different model.
    assert cold.labelled_public == {} and cold.labelled_public_total == 0
    assert warm.labelled_public == {"warm_start": 40} and warm.labelled_public_total == 40
    assert warm.rounds[0].accuracy != cold.rounds[0].accuracy


def test_strategies_with_the_same_validation_budget_read_the_same_samples():
    from fedkd.registry import resolve_strategy

    scenario = copy.deepcopy(TINY)
    ctx = SimulationContext(parse_scenario(scenario))
    expected = labelled_public(ctx.scenario.seed, len(ctx.dataset.split("public")), 50)
    for name, params in (("ra_cmkd", {"check_teachers": False}), ("feddf", {})):
        strategy = resolve_strategy(name).cls(validation_samples=50, **params)
        strategy.fedkd_setup(StrategyEnv.of(ctx))
        read = strategy.fedkd_labels_read()
        assert np.array_equal(np.sort(read["validation"]), expected), name
