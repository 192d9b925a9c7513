"""Model architectures when devices differ, for strategies that keep one
global model per architecture (FedDF, the centralized reference).

A device's architecture is its model tier *and* the sensors it has: a
sensor-only mote runs a model with a sensor encoder and nothing else, so it
never downloads, trains or uploads an encoder for a camera it does not have.
Two devices share weights only when both tier and sensors match.

Here: the architecture key, the census of the population by architecture,
and what FedDF and the centralized reference share (checkpoints, and which
model a device of the evaluation panel runs: its architecture's). Devices train a per-architecture model with
fedkd's weight-training task, which builds the encoders it is sent.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from .contract import FedkdStrategy, StrategyEnv
from .scoring import PanelModel
from .sim.grid import NodeProfile
from .weight_training import WEIGHTS_BATCHED, train_weights
from .context import SimulationContext

# The message type of a task that trains the device's own architecture.
TRAIN_OWN_ARCHITECTURE = "train.architecture"


@dataclass(frozen=True, order=True)
class Architecture:
    tier: str
    modalities: tuple[str, ...]  # in dataset order

    @property
    def key(self) -> str:
        """A column-safe name: ``small_camera+sensor``."""
        return f"{self.tier}_{'+'.join(self.modalities)}"

    @classmethod
    def of(cls, profile: NodeProfile) -> "Architecture":
        return cls(profile.model_tier, tuple(profile.modalities))


def population_architectures(ctx: SimulationContext) -> dict[Architecture, int]:
    """How many devices of the population run each architecture.

    Vectorised over device ids (a million devices cost a few numpy arrays);
    the same rule as ``SimulationContext.modalities_of``: the class's own
    modalities, else the device's draw from the modality mix, else all.
    """
    population, names = ctx.population, ctx.dataset.modality_names
    ids = np.arange(population.size)
    mix = ctx.partitioner.modality_mix
    pairs = np.stack([population.class_index(ids).astype(np.int64),
                      mix.index(ids) if mix is not None else np.zeros(len(ids), np.int64)])
    counts: dict[Architecture, int] = {}
    # One entry per (device class, modality-mix draw) that occurs; several may map to one architecture.
    columns, sizes = np.unique(pairs, axis=1, return_counts=True)
    for (class_i, mix_i), n in zip(columns.T, sizes):
        spec = population.classes[int(class_i)]
        chosen = spec.modalities or (mix.sets[int(mix_i)] if mix is not None else None) or names
        arch = Architecture(spec.model_tier or ctx.scenario.training.model_tier,
                            tuple(m for m in names if m in chosen))
        counts[arch] = counts.get(arch, 0) + int(n)
    return dict(sorted(counts.items()))


def new_model(ctx: SimulationContext, arch: Architecture) -> nn.Module:
    """A fresh model of ``arch``, initialised from the scenario's seed."""
    return ctx.new_model(arch.tier, modalities=arch.modalities)


class ArchitectureModels(FedkdStrategy):
    """For strategies that keep one model per architecture on the server (FedDF, the
    centralized reference): checkpoints of ``self.models`` and their scoring, built for
    ``self.devices`` (Architecture -> devices of the population that run it) by
    :meth:`fedkd_setup`. Devices train their architecture's model with the weight-training
    task (``train.architecture``)."""

    shares_weights = False  # weights are averaged only within an architecture: any mix of tiers and sensors
    device_tasks = {TRAIN_OWN_ARCHITECTURE: train_weights}
    batched_tasks = {TRAIN_OWN_ARCHITECTURE: WEIGHTS_BATCHED}
    models: dict[Architecture, nn.Module]
    devices: dict[Architecture, int]
    ctx: SimulationContext | None = None

    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before round 1: the server's context, and one fresh model per architecture."""
        super().fedkd_setup(env)
        self.ctx = env.ctx
        self.devices = population_architectures(env.ctx)
        self.models = {arch: new_model(env.ctx, arch) for arch in self.devices}

    def fedkd_state(self) -> dict:
        """The model of each architecture, for checkpoints."""
        return {"models": {arch.key: model.state_dict() for arch, model in self.models.items()}}

    def fedkd_restore(self, state: dict) -> None:
        for arch, model in self.models.items():
            model.load_state_dict(state["models"][arch.key])

    def fedkd_panel_model(self, ctx, device, device_state) -> PanelModel:
        """A device runs its architecture's global model (fedkd.scoring)."""
        arch = Architecture(device.model_tier, device.modalities)
        return PanelModel(("architecture", arch), lambda: self.models[arch])
