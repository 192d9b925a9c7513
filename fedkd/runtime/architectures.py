"""Model architectures when devices differ, for strategies that keep one
global model per architecture (FedDF, the centralized reference).

A device's architecture is its model tier *and* the sensors it has: a
sensor-only mote runs a model with a sensor encoder and nothing else, so it
never downloads, trains or uploads an encoder for a camera it does not have.
Two devices share weights only when both tier and sensors match.

Here: the architecture key, the census of the population by architecture,
the scoring of per-architecture models on the test split, and what FedDF and
the centralized reference share. Devices train a per-architecture model with
the ordinary ``train`` handler, which builds the encoders it is sent.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..sim.grid import NodeProfile
from ..training import accuracy
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


@contextmanager
def single_threaded() -> Iterator[None]:
    """Server-side training and scoring on one thread, as client tasks run: the same numbers
    whichever strategy ran first in this process and on every backend (and no fight for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def new_model(ctx: SimulationContext, arch: Architecture) -> nn.Module:
    """A fresh model of ``arch``, initialised from the scenario's seed."""
    return ctx.new_model(arch.tier, modalities=arch.modalities)


def score_architectures(ctx: SimulationContext, models: Mapping[Architecture, nn.Module],
                        devices: Mapping[Architecture, int]) -> tuple[float, dict[str, float]]:
    """Test accuracy of each architecture's model, each fed the sensors it has.

    The headline accuracy is the mean over architectures weighted by how many
    devices run each (``devices``): the accuracy of the average device of the
    population if every device used its architecture's global model. The
    columns ``accuracy_tier_<tier>`` and ``accuracy_<modalities>_devices`` are
    the same device-weighted means within a tier or a sensor set, named as the
    logit-exchange strategies name theirs, so the tables line up.
    """
    test = ctx.test_split
    with single_threaded():
        scores = {arch: accuracy(model, test, arch.modalities) for arch, model in sorted(models.items())}
    return architecture_metrics(scores, devices)


def architecture_metrics(scores: Mapping[Architecture, float], devices: Mapping[Architecture, int]
                         ) -> tuple[float, dict[str, float]]:
    """The headline and the per-tier, per-sensor-set and per-architecture columns of
    :func:`score_architectures`, from a test accuracy per architecture."""
    weights = {arch: float(devices.get(arch, 0)) for arch in scores}
    if sum(weights.values()) == 0:  # no census (a hand-built strategy): every architecture counts once
        weights = dict.fromkeys(scores, 1.0)

    def mean(archs) -> float:
        archs = list(archs)
        total = sum(weights[a] for a in archs)
        return sum(scores[a] * weights[a] for a in archs) / total if total else float(np.mean([scores[a] for a in archs]))

    metrics = {"accuracy_min": min(scores.values()), "architectures": float(len(scores))}
    for tier in sorted({a.tier for a in scores}):
        metrics[f"accuracy_tier_{tier}"] = mean(a for a in scores if a.tier == tier)
    for mods in sorted({a.modalities for a in scores}):
        metrics[f"accuracy_{'+'.join(mods)}_devices"] = mean(a for a in scores if a.modalities == mods)
    for arch, score in scores.items():
        metrics[f"accuracy_arch_{arch.key}"] = score
    return mean(scores), metrics


class ArchitectureModels:
    """For strategies that keep one model per architecture on the server (FedDF, the
    centralized reference): checkpoints and scoring of ``self.models``, built for
    ``self.devices`` (Architecture -> devices of the population that run it)."""

    models: dict[Architecture, nn.Module]
    devices: dict[Architecture, int]

    def fedkd_state(self) -> dict:
        """The model of each architecture, for checkpoints."""
        return {"models": {arch.key: model.state_dict() for arch, model in self.models.items()}}

    def fedkd_restore(self, state: dict) -> None:
        for arch, model in self.models.items():
            model.load_state_dict(state["models"][arch.key])

    def fedkd_evaluate(self, ctx, device_state) -> tuple[float, dict[str, float]]:
        return score_architectures(ctx, self.models, self.devices)
