"""Which partitioner deals a run's shards (fedkd's lazy one, or a Flower Datasets one),
and the checks of ``data.partition`` against the dataset and population.

Apart from :mod:`fedkd.data.partition` so that neither partitioner imports the other.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..errors import FedkdError, ScenarioError
from ..scenario import PartitionSpec, Scenario, modality_set
from .partition import Partitioner


def make_partitioner(spec: PartitionSpec, labels: np.ndarray, domains: np.ndarray | None, num_classes: int,
                     seed: int, num_devices: int | None = None):
    """fedkd's own :class:`Partitioner`, or the Flower Datasets one ``spec.partitioner`` names."""
    if spec.partitioner is None:
        return Partitioner(spec, labels, domains, num_classes, seed, num_devices)
    from .flower_partition import FlowerPartitioner  # only now: it imports Hugging Face datasets

    return FlowerPartitioner(spec, labels, domains, num_classes, seed, num_devices)


def check_partition(scenario: Scenario, path: str, modality_names: tuple[str, ...]) -> None:
    """Check ``data.partition`` against the dataset and population; a ScenarioError names the key."""
    spec = scenario.data.partition
    for key in spec.modality_mix or {}:
        for name in modality_set(key):
            if name not in modality_names:
                raise ScenarioError(path, f"data.partition.modality_mix.{key}",
                                    f"unknown modality {name!r}; dataset {scenario.data.dataset!r} "
                                    f"has {list(modality_names)}")
    if spec.modality_mix and all(c.modalities for c in scenario.population.classes):
        raise ScenarioError(path, "data.partition.modality_mix",
                            "every device class fixes its own `modalities`, so the mix applies to no "
                            "device; leave `modalities` out of a class for the mix to apply")
    if spec.partitioner is not None:
        _check_flower_partitioner(scenario, path)
    if spec.disjoint:
        from . import load_dataset  # only now: dealing needs the train labels

        dataset = load_dataset(scenario.data.dataset, scenario.data.options, scenario.seed)
        train = dataset.split("train")
        try:
            Partitioner(spec, train.labels, train.domains, dataset.num_classes, scenario.seed,
                        scenario.population.devices)
        except FedkdError as exc:
            raise ScenarioError(path, "data.partition.disjoint", str(exc)) from None


def _check_flower_partitioner(scenario: Scenario, path: str) -> None:
    """Build the named partitioner, deal, and check it: errors name ``data.partition.*``."""
    from . import load_dataset
    from .flower_partition import FlowerPartitioner, partitioner_class, partitioner_params
    from ..registry import check_params  # the strategies' params check, on the partitioner's constructor

    spec = scenario.data.partition
    try:
        cls = partitioner_class(spec.partitioner)
    except FedkdError as exc:
        raise ScenarioError(path, "data.partition.partitioner", str(exc)) from None
    problem = check_params(SimpleNamespace(name=spec.partitioner, cls=cls),
                           partitioner_params(cls, spec.params, scenario.seed, scenario.population.devices))
    if problem:
        raise ScenarioError(path, "data.partition.params", problem)
    dataset = load_dataset(scenario.data.dataset, scenario.data.options, scenario.seed)
    train = dataset.split("train")
    try:
        FlowerPartitioner(spec, train.labels, train.domains, dataset.num_classes, scenario.seed,
                          scenario.population.devices).check()
    except FedkdError as exc:
        raise ScenarioError(path, "data.partition.params", str(exc)) from None
