"""Checks of a scenario against what it names: the dataset, its options and
modalities, the strategies and their parameters. Run before anything runs, so
a typo fails in a second with the key path, not after an hour of simulation."""
from __future__ import annotations

from pathlib import Path

from .data.checks import check_data
from .data.dealing import check_partition
from .errors import FedkdError, ScenarioError
from .registry import check_params, resolve_strategy, strategy_params
from .scenario import Scenario, read_scenario


def load_scenario(path: str | Path) -> Scenario:
    """Load and validate a scenario file, including the data and strategy references."""
    scenario = read_scenario(path)
    check_references(scenario, str(path))
    return scenario


def check_references(scenario: Scenario, path: str, strict_defaults: bool = True) -> None:
    # The dataset is built and every split checked against the interface: a malformed
    # dataset fails here, in one line, not in the middle of the first round.
    modalities = check_data(scenario, path).modality_names
    for i, c in enumerate(scenario.population.classes):
        for m in c.modalities or []:
            if m not in modalities:
                raise ScenarioError(path, f"population.classes[{i}].modalities",
                                    f"unknown modality {m!r}; dataset {scenario.data.dataset!r} has {list(modalities)}")
    check_partition(scenario, path, modalities)
    tiers = {c.model_tier or scenario.training.model_tier for c in scenario.population.classes}
    used_defaults: set[str] = set()
    for i, spec in enumerate(scenario.strategies):
        try:
            ref = resolve_strategy(spec.name)
        except FedkdError as exc:
            raise ScenarioError(path, f"strategies[{i}].name", str(exc)) from None
        params = strategy_params(ref, scenario.strategy_defaults, spec.params)
        used_defaults |= set(params) - set(spec.params)
        problem = check_params(ref, params)
        if problem:
            raise ScenarioError(path, f"strategies[{i}].params", problem)
        try:
            # Build it once now: a constructor that rejects a value should fail here, not mid-run.
            ref.cls(**params)
        except (ValueError, TypeError, FedkdError) as exc:
            raise ScenarioError(path, f"strategies[{i}].params", f"{spec.name}: {exc}") from None
        if ref.shares_weights and len(tiers) > 1:
            raise ScenarioError(path, f"strategies[{i}]",
                                f"{spec.name} averages model weights, so all devices need one architecture, "
                                f"but the device classes use model tiers {sorted(tiers)}; "
                                "use a logit-exchange strategy or one model_tier")
    try:  # the device tasks the strategies bring: two claiming one message type fail here
        from .device_tasks import tasks_of

        tasks_of(spec.name for spec in scenario.strategies)
    except FedkdError as exc:
        raise ScenarioError(path, "strategies", str(exc)) from None
    unused = set(scenario.strategy_defaults) - used_defaults
    if unused and strict_defaults:
        raise ScenarioError(path, f"strategy_defaults.{sorted(unused)[0]}",
                            "no strategy of this scenario takes this parameter")

