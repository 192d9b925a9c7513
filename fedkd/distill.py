"""Knowledge-distillation losses and the ways a server or fog node combines
the predictions of many devices into one target.

All aggregators take a stack of per-device predictions shaped
(devices, samples, classes) and per-device weights, and return one target per
sample. They are plain numpy so that strategies stay cheap and testable by
hand.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .data.base import Split
from .losses import kd_loss
from .training import model_device, to_tensors


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def mean_logits(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of logits: FedMD's consensus (Li & Wang 2019)."""
    w = np.asarray(weights, dtype=np.float64)
    return np.tensordot(w / w.sum(), logits, axes=1)


def mean_probabilities(logits: np.ndarray, weights: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Weighted mean of softened probabilities: a classic ensemble teacher."""
    w = np.asarray(weights, dtype=np.float64)
    return np.tensordot(w / w.sum(), softmax(logits, temperature), axes=1)


def entropy_reduction(logits: np.ndarray, weights: np.ndarray, temperature: float) -> np.ndarray:
    """DS-FL's entropy reduction aggregation (Itahara et al. 2021, arXiv:2008.06180).

    Average the devices' probabilities, then sharpen the average with a
    softmax at temperature ``temperature`` < 1: ERA(p)_c = exp(p_c / T) / sum_j exp(p_j / T).
    Sharpening counters the high entropy of an average over non-IID devices.
    """
    return softmax(mean_probabilities(logits, weights), temperature)


def distill_on(model: nn.Module, data: Split, modalities: Sequence[str], target_probs: np.ndarray, *,
               epochs: int, batch_size: int, learning_rate: float, temperature: float, seed: int) -> float:
    """Train ``model`` towards ``target_probs`` on ``data`` (no labels used). Returns the mean loss."""
    device = model_device(model)
    inputs = to_tensors(data, modalities, device)
    targets = torch.from_numpy(np.ascontiguousarray(target_probs, dtype=np.float32)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator).to(device)  # drawn on the CPU
        for start in range(0, len(targets), batch_size):
            idx = order[start:start + batch_size]
            loss = kd_loss(model({m: x[idx] for m, x in inputs.items()}), targets[idx], temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    return total / max(batches, 1)
