"""What a process needs to act for any device: the dataset, the partitioner,
the population. Built lazily, once per process and scenario, so a Ray worker
loads the data itself instead of receiving it with every message."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from ..data import Dataset, Split, load_dataset
from ..data.partition import Partitioner
from ..models import build_model, measure_cost
from ..models.multimodal import MultimodalNet
from ..scenario import Scenario
from ..sim.population import Population


@dataclass(frozen=True)
class DeviceView:
    """One device as the client sees it: its sensors, its samples, its model size."""

    device_id: int
    device_class: str
    modalities: tuple[str, ...]
    model_tier: str
    data: Split


class SimulationContext:
    def __init__(self, scenario: Scenario):
        self.scenario = scenario

    @cached_property
    def dataset(self) -> Dataset:
        spec = self.scenario.data
        return load_dataset(spec.dataset, spec.options, self.scenario.seed)

    @cached_property
    def population(self) -> Population:
        return Population(self.scenario.population, self.scenario.seed)

    @cached_property
    def partitioner(self) -> Partitioner:
        train = self.dataset.split("train")
        return Partitioner(self.scenario.data.partition, train.labels, train.domains,
                           self.dataset.num_classes, self.scenario.seed)

    @cached_property
    def test_split(self) -> Split:
        test = self.dataset.split("test")
        limit = self.scenario.data.test_samples
        return test if limit is None or limit >= len(test) else test.subset(np.arange(limit))

    def device(self, device_id: int) -> DeviceView:
        device_class = self.population.class_of(device_id)
        modalities = tuple(device_class.modalities or self.dataset.modality_names)
        shard = self.partitioner.shard(device_id)
        tier = device_class.model_tier or self.scenario.training.model_tier
        return DeviceView(device_id, device_class.name, modalities, tier,
                          self.dataset.split("train").subset(shard.indices))

    def new_model(self, tier: str) -> MultimodalNet:
        return build_model(self.dataset.modalities, self.dataset.num_classes, tier,
                           seed=self.scenario.seed)

    def train_flops_per_sample(self, tier: str, modalities: tuple[str, ...]) -> int:
        return measure_cost(self.dataset.modalities, self.dataset.num_classes, tier,
                            modalities).train_flops_per_sample

    def forward_flops_per_sample(self, tier: str, modalities: tuple[str, ...]) -> int:
        return measure_cost(self.dataset.modalities, self.dataset.num_classes, tier,
                            modalities).forward_flops_per_sample


@lru_cache(maxsize=4)
def _context(scenario_json: str) -> SimulationContext:
    return SimulationContext(Scenario.model_validate_json(scenario_json))


def simulation_context(scenario: Scenario) -> SimulationContext:
    """The process-wide context for ``scenario`` (keyed by its canonical JSON)."""
    return _context(scenario.model_dump_json())
