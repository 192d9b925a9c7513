"""Lightweight feature alignment across modalities on the paired public set.

Every public sample has every modality, so the camera encoder's features of
sample i and the sensor encoder's features of the same sample i describe the
same stall at the same moment. A small projection head per (model,
modality) maps that encoder's features into one shared space, and a
symmetric InfoNCE loss (as in CLIP, Radford et al. 2021,
arXiv:2103.00020) pulls each pair together and pushes the other samples of
the batch apart. Negatives keep the heads from collapsing onto a constant,
which a plain cosine or MSE between pairs would allow.

The heads are sized to the model they serve, so to the device's resources:
a ``tiny`` model gets a single linear map, larger tiers one hidden layer as
wide as their features. The heads live where the alignment is trained (the
fog); the encoders they shape are what devices download.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedkd.models.multimodal import TIERS, MultimodalNet


def projection_head(tier: str, out_dim: int, seed: int) -> nn.Module:
    """A head from a ``tier`` model's features to the ``out_dim``-dimensional shared space."""
    features = TIERS[tier][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tier == "tiny":
            return nn.Linear(features, out_dim)
        return nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.Linear(features, out_dim))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between row-paired projections ``a`` and ``b`` (batch, dim)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=logits.device)  # where the model runs (backend.torch_device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def alignment_loss(models: Sequence[MultimodalNet], heads: Sequence[Mapping[str, nn.Module]],
                   inputs: Mapping[str, torch.Tensor], temperature: float = 0.1) -> torch.Tensor | None:
    """Mean InfoNCE over every pair of encoders that see *different* modalities.

    ``models[k]`` has one head per modality it encodes in ``heads[k]``. A
    camera-only and a sensor-only model are aligned with each other; a model
    with both sensors also aligns its own two encoders (so its fused mean
    averages features that mean the same thing). None when the models see
    one modality between them.
    """
    projected: list[tuple[str, torch.Tensor]] = []
    for model, model_heads in zip(models, heads):
        for name, encoder in model.encoders.items():
            projected.append((name, model_heads[name](encoder(inputs[name]))))
    losses = [info_nce(za, zb, temperature)
              for i, (ma, za) in enumerate(projected) for mb, zb in projected[i + 1:] if ma != mb]
    return torch.stack(losses).mean() if losses else None
