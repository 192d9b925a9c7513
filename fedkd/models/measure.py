"""What a model costs: parameters, bytes and FLOPs, measured, not estimated.

FLOPs come from torch's own counter (``torch.utils.flop_counter``) over one
forward pass and one forward+backward pass on a single sample per modality
subset, so the simulated compute time follows the real architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..data.base import ModalitySpec
from .multimodal import MultimodalNet


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    bytes_fp32: int
    forward_flops_per_sample: int
    train_flops_per_sample: int  # forward + backward


def _sample(modalities: tuple[ModalitySpec, ...], used: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {m.name: torch.zeros((1, *m.shape)) for m in modalities if m.name in used}


@lru_cache(maxsize=64)
def measure_cost(modalities: tuple[ModalitySpec, ...], num_classes: int, tier: str,
                 used: tuple[str, ...]) -> ModelCost:
    """Cost of the model for samples that carry the modalities in ``used``.

    Cached per architecture: the counter runs once per process and key.
    """
    model = MultimodalNet(modalities, num_classes, tier)
    params = sum(p.numel() for p in model.parameters())
    inputs = _sample(modalities, used)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(inputs)
    with FlopCounterMode(display=False) as train:
        model(inputs).sum().backward()
    return ModelCost(params, params * 4, forward.get_total_flops(), train.get_total_flops())
