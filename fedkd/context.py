"""What a process needs to act for any device: the dataset, the partitioner,
the population. Built lazily, once per process and scenario, so a Ray worker
loads the data itself instead of receiving it with every message."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from .data import Dataset, Split, load_dataset
from .data.dealing import make_partitioner
from .data.partition import Partitioner
from .models import build_model, measure_cost
from .models.multimodal import MultimodalNet
from .scenario import Scenario
from .seeding import hashed_uniform
from .sim.population import Population


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
    def torch_device(self) -> torch.device:
        """Where models train and predict (``backend.torch_device``, ``auto`` resolved here)."""
        return resolve_torch_device(self.scenario.backend.torch_device)

    @cached_property
    def population(self) -> Population:
        return Population(self.scenario.population, self.scenario.seed)

    @cached_property
    def partitioner(self) -> Partitioner:
        train = self.dataset.split("train")
        # fedkd's lazy partitioner, or a Flower Datasets one (same interface) when the scenario names it.
        return make_partitioner(self.scenario.data.partition, train.labels, train.domains,
                                self.dataset.num_classes, self.scenario.seed, self.scenario.population.devices)

    @cached_property
    def test_split(self) -> Split:
        test = self.dataset.split("test")
        limit = self.scenario.data.test_samples
        return test if limit is None or limit >= len(test) else test.subset(np.arange(limit))

    def modalities_of(self, device_id: int) -> tuple[str, ...]:
        """What a device senses, in dataset order.

        Its device class's ``modalities`` when the class fixes them (they take
        precedence), else its draw from ``data.partition.modality_mix``, else all.
        """
        chosen = (self.population.class_of(device_id).modalities
                  or self.partitioner.modalities_of(device_id) or self.dataset.modality_names)
        return tuple(m for m in self.dataset.modality_names if m in chosen)

    def device(self, device_id: int) -> DeviceView:
        device_class = self.population.class_of(device_id)
        modalities = self.modalities_of(device_id)
        shard = self.partitioner.shard(device_id)
        tier = device_class.model_tier or self.scenario.training.model_tier
        train = self.dataset.split("train")
        # A device holds only what it senses: the other modalities' inputs are not in its shard.
        sensed = Split({m: train.inputs[m] for m in modalities}, train.labels, train.domains, train.meta)
        return DeviceView(device_id, device_class.name, modalities, tier, sensed.subset(shard.indices))

    def fog_of(self, device_id: int) -> int | None:
        """The fog node a device is attached to; None without a topology."""
        topology = self.scenario.topology
        if topology is None:
            return None
        domain = self.partitioner.domain_of(device_id) if topology.assign == "by_domain" else None
        if domain is not None:
            return int(domain) % topology.fogs
        return int(hashed_uniform(np.array([device_id]), self.scenario.seed, "fog")[0] * topology.fogs)

    def new_model(self, tier: str, seed: int | None = None,
                  modalities: tuple[str, ...] | None = None) -> MultimodalNet:
        """A fresh model with an encoder for each of ``modalities`` (all by default).

        The global model's seed by default; a device's own when given, so that
        devices with their own models start apart. Placed on :attr:`torch_device`.
        """
        specs = [m for m in self.dataset.modalities if modalities is None or m.name in modalities]
        model = build_model(specs, self.dataset.num_classes, tier,
                            seed=self.scenario.seed if seed is None else seed)
        # Built on the CPU either way: the same seed gives the same initial weights on any device.
        return model if self.torch_device.type == "cpu" else model.to(self.torch_device)

    def train_flops_per_sample(self, tier: str, modalities: tuple[str, ...]) -> int:
        return measure_cost(self.dataset.modalities, self.dataset.num_classes, tier,
                            modalities).train_flops_per_sample

    def forward_flops_per_sample(self, tier: str, modalities: tuple[str, ...]) -> int:
        return measure_cost(self.dataset.modalities, self.dataset.num_classes, tier,
                            modalities).forward_flops_per_sample


def resolve_torch_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda if torch sees a GPU, else cpu) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@lru_cache(maxsize=4)
def _context(scenario_json: str) -> SimulationContext:
    return SimulationContext(Scenario.model_validate_json(scenario_json))


def simulation_context(scenario: Scenario) -> SimulationContext:
    """The process-wide context for ``scenario`` (keyed by its canonical JSON)."""
    return _context(scenario.model_dump_json())
