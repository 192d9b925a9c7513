"""A multimodal classifier: one encoder per modality, features fused by a mean
over the modalities a sample has, one linear head.

A device that lacks a modality simply does not feed it: the fused feature is
the mean over the encoders that ran, as in the FedMultimodal benchmark's
missing-modality setting (Feng et al. 2023, arXiv:2306.09486). This lets
FedAvg and FedProx train one shared model over devices with different sensors.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..data.base import ModalitySpec

# Channel widths per tier; "base" costs roughly 4x the FLOPs of "small".
TIERS: dict[str, tuple[int, int]] = {"tiny": (8, 16), "small": (16, 32), "base": (32, 64)}


class PerImageStandardize(nn.Module):
    """Zero mean, unit spread per image: cameras see the same stall at noon and at
    night, and a small CNN learns far faster when it need not model the light level."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-3)


def image_encoder(in_channels: int, tier: str) -> nn.Module:
    c1, c2 = TIERS[tier]
    return nn.Sequential(
        PerImageStandardize(),
        nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        # Keep a coarse layout: global pooling would throw away where strokes are.
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(9 * c2, c2), nn.ReLU(),
    )


def series_encoder(in_channels: int, tier: str) -> nn.Module:
    c1, c2 = TIERS[tier]
    return nn.Sequential(
        nn.Conv1d(in_channels, c1, 5, padding=2), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(c1, c2, 5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(4 * c2, c2), nn.ReLU(),
    )


class MultimodalNet(nn.Module):
    def __init__(self, modalities: Sequence[ModalitySpec], num_classes: int, tier: str = "small"):
        super().__init__()
        if tier not in TIERS:
            raise ValueError(f"unknown model tier {tier!r}; expected one of {sorted(TIERS)}")
        self.tier = tier
        builders = {"image": image_encoder, "series": series_encoder}
        self.encoders = nn.ModuleDict({m.name: builders[m.kind](m.shape[0], tier) for m in modalities})
        self.feature_dim = TIERS[tier][1]
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        present = [name for name in self.encoders if name in inputs]
        if not present:
            raise ValueError(f"no input for any modality of this model ({list(self.encoders)})")
        return torch.stack([self.encoders[name](inputs[name]) for name in present]).mean(0)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(inputs))


def build_model(modalities: Sequence[ModalitySpec], num_classes: int, tier: str, seed: int) -> MultimodalNet:
    """A freshly initialised model; the same seed gives the same weights in any process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MultimodalNet(modalities, num_classes, tier)
