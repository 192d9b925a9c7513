"""Local training and evaluation of one model on one device's samples.

Shuffling and initialisation take their randomness from explicit seeds, so a
device's update is the same in any process and under any backend.

Work runs where the model's parameters are (``backend.torch_device``; the
context places new models): inputs follow the model, results come back on
the CPU. Shuffles are drawn on the CPU, so a GPU run sees the same batches.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data.base import Split
from .self_distill import AuxiliaryHeads


def to_tensors(split: Split, modalities: Sequence[str],
               device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The split's inputs as tensors, on ``device`` when given (else the CPU, sharing memory)."""
    tensors = {m: torch.from_numpy(np.ascontiguousarray(split.inputs[m])) for m in modalities}
    return tensors if device is None else {m: t.to(device) for m, t in tensors.items()}


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@dataclass(frozen=True)
class TrainOutcome:
    num_examples: int
    mean_loss: float
    extra_flops: float = 0.0  # spent beyond the model's own training (self-distillation heads)


def train_local(model: nn.Module, data: Split, modalities: Sequence[str], *, epochs: int,
                batch_size: int, learning_rate: float, seed: int,
                proximal_mu: float = 0.0, optimizer: str = "adam",
                self_distillation=None) -> TrainOutcome:
    """Cross-entropy with Adam (fresh each task: devices keep no optimizer state)
    or plain SGD; with ``proximal_mu > 0`` adds FedProx's term
    (mu / 2) * ||w - w_global||^2 (Li et al. 2020, arXiv:1812.06127).

    ``self_distillation`` (a ``SelfDistillSpec``; None = off) trains auxiliary
    heads alongside and adds their loss (fedkd.self_distill). The heads are
    created at random (from ``seed``) for this call, trained only during it and
    dropped at the end: they are re-initialised every task and never carried
    over. Their FLOPs are returned as ``extra_flops``."""
    device = model_device(model)
    inputs = to_tensors(data, modalities, device)
    labels = torch.from_numpy(data.labels.astype(np.int64)).to(device)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    heads = AuxiliaryHeads(model, seed).to(device) if self_distillation is not None else None
    params = list(model.parameters()) + (list(heads.parameters()) if heads is not None else [])
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, batches = 0.0, 0
    with heads.attached() if heads is not None else nullcontext():
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator).to(device)
            for start in range(0, len(labels), batch_size):
                idx = order[start:start + batch_size]
                logits = model({m: x[idx] for m, x in inputs.items()})
                loss = loss_fn(logits, labels[idx])
                if heads is not None:
                    loss = loss + heads.regularizer(logits, labels[idx], self_distillation)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                    loss = loss + 0.5 * proximal_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                batches += 1
    extra = heads.train_flops_per_sample(modalities) * len(labels) * epochs if heads is not None else 0.0
    return TrainOutcome(len(labels), total / max(batches, 1), float(extra))


@torch.no_grad()
def predict_logits(model: nn.Module, data: Split, modalities: Sequence[str],
                   batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    inputs = to_tensors(data, modalities, model_device(model))
    out = [model({m: x[s:s + batch_size] for m, x in inputs.items()})
           for s in range(0, len(data), batch_size)]
    return torch.cat(out).cpu() if out else torch.empty(0)


def accuracy(model: nn.Module, data: Split, modalities: Sequence[str]) -> float:
    logits = predict_logits(model, data, modalities)
    if len(logits) == 0:
        return float("nan")
    return float((logits.argmax(1).numpy() == data.labels).mean())
