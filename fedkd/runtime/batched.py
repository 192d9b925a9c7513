"""Several devices' local training as one batched computation.

Tiny models train far from the hardware's limit one at a time: each step is a
few small kernels, and dispatching them costs more than running them. Devices
of one phase that share an architecture and a training configuration can
instead train together: their parameters stacked along a leading device axis,
one ``torch.func.vmap`` of ``functional_call`` + ``grad`` computing every
device's gradient at once, and a functional optimizer step per device.

Each device keeps what makes its update its own: its shard, its shuffle (the
same seeded ``randperm`` per epoch as :func:`fedkd.training.train_local`), its
step count and its Adam moments. Shards of unequal size take different numbers
of steps: a device with no batch left sits the step out (only the devices with
a batch compute, and only their parameters and optimizer state change), and a
short last batch is padded and masked, its loss the mean over its real samples.

Not yet on the run path: the ClientApp's ``handle_train`` (fedkd.runtime.client)
runs one message at a time; a batched handler there, given a phase's train
messages that share the sent arrays and config, would build the models as it
does and call :func:`train_batched` where :func:`batchable` allows.

The result equals :func:`~fedkd.training.train_local` run device by device up
to float rounding (vmapped kernels sum in another order): tests/test_batched.py
states the tolerance. Self-distillation heads are not batched: ``batchable``
says which tasks can be, the others go one by one.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..data.base import Split
from ..training import TrainOutcome, model_device

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which train_local uses
ADAM_EPS = 1e-8


def batchable(optimizer: str, self_distillation) -> bool:
    """Whether :func:`train_batched` does what ``train_local`` does for these settings."""
    return optimizer in ("adam", "sgd") and self_distillation is None


def _step_indices(sizes: Sequence[int], batch_size: int, epochs: int,
                  seeds: Sequence[int]) -> list[list[torch.Tensor]]:
    """Per device, its batches' sample indices in order: the shuffles train_local draws."""
    per_device = []
    for n, seed in zip(sizes, seeds):
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            batches.extend(order[start:start + batch_size] for start in range(0, n, batch_size))
        per_device.append(batches)
    return per_device


def train_batched(models: Sequence[nn.Module], data: Sequence[Split], modalities: Sequence[str], *,
                  epochs: int, batch_size: int, learning_rate: float, seeds: Sequence[int],
                  proximal_mu: float = 0.0, optimizer: str = "adam") -> list[TrainOutcome]:
    """Train ``models`` (one architecture, one device each, on ``data``) together, in place.

    The same arguments as :func:`fedkd.training.train_local`, one seed per device."""
    if not models:
        return []
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected adam or sgd")
    base, device = models[0], model_device(models[0])
    names = [name for name, _ in base.named_parameters()]
    params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).clone()
              for name in names}
    anchor = {name: p.clone() for name, p in params.items()} if proximal_mu > 0 else None
    sizes = [len(d) for d in data]
    width = max(sizes)
    # Inputs padded to the largest shard: (devices, samples, ...), labels likewise.
    inputs = {m: torch.stack([_padded(torch.from_numpy(np.ascontiguousarray(d.inputs[m])), width) for d in data])
              .to(device) for m in modalities}
    labels = torch.stack([_padded(torch.from_numpy(d.labels.astype(np.int64)), width) for d in data]).to(device)
    batches = _step_indices(sizes, batch_size, epochs, seeds)
    steps = max(len(b) for b in batches)
    # Every step's sample indices (devices x batch), padded, and which of them are real.
    index = torch.zeros(steps, len(models), batch_size, dtype=torch.int64)
    mask = torch.zeros(steps, len(models), batch_size)
    for i, device_batches in enumerate(batches):
        for step, idx in enumerate(device_batches):
            index[step, i, :len(idx)], mask[step, i, :len(idx)] = idx, 1.0
    active_steps = mask.sum(2) > 0  # (steps, devices): who takes a step
    index, mask = index.to(device), mask.to(device)
    rows = torch.arange(len(models), device=device)[:, None]

    def device_loss(p, x, y, mask, a):
        logits = functional_call(base, p, (x,))
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = (losses * mask).sum() / mask.sum().clamp(min=1)  # the mean over real samples
        if a is not None:
            loss = loss + 0.5 * proximal_mu * sum(((p[k] - a[k]) ** 2).sum() for k in p)
        return loss

    grads_and_losses = vmap(grad_and_value(device_loss), in_dims=(0, 0, 0, 0, 0 if anchor is not None else None))
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()}
    taken = torch.zeros(len(models), dtype=torch.float64)  # optimizer steps per device
    totals = [0.0] * len(models)
    base.train()
    for step in range(steps):
        # Only the devices with a batch left compute: shards differ in size, so late steps
        # have fewer of them.
        on = torch.nonzero(active_steps[step]).flatten()
        every = len(on) == len(models)
        on_dev = on.to(device)
        pick = (lambda t: t) if every else (lambda t: t.index_select(0, on_dev))
        sub = {k: pick(v) for k, v in params.items()}
        x = {m: t[rows, index[step]] for m, t in inputs.items()} if every else \
            {m: t[on_dev[:, None], index[step, on_dev]] for m, t in inputs.items()}
        y = labels[rows, index[step]] if every else labels[on_dev[:, None], index[step, on_dev]]
        grads, losses = grads_and_losses(sub, x, y, pick(mask[step]),
                                         None if anchor is None else {k: pick(v) for k, v in anchor.items()})
        taken[on] += 1
        _apply(params, sub, grads, moments, taken[on], on_dev, every, learning_rate, optimizer)
        for i, loss in zip(on.tolist(), losses.tolist()):
            totals[i] += loss
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][i])
    return [TrainOutcome(n, totals[i] / max(len(batches[i]), 1)) for i, n in enumerate(sizes)]


def _padded(tensor: torch.Tensor, width: int) -> torch.Tensor:
    if len(tensor) == width:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((width - len(tensor), *tensor.shape[1:]))])


@torch.no_grad()
def _apply(params: dict[str, torch.Tensor], sub: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
           moments: dict[str, tuple[torch.Tensor, torch.Tensor]], taken: torch.Tensor, on: torch.Tensor,
           every: bool, lr: float, optimizer: str) -> None:
    """One optimizer step for the devices ``on`` (torch.optim.Adam's or SGD's arithmetic):
    ``sub`` holds their parameters, ``taken`` their step counts after this step."""
    if optimizer == "adam":
        beta1, beta2 = ADAM_BETAS
        step_size = (lr / (1 - beta1 ** taken)).to(torch.float32).to(on.device)
        correction2_sqrt = torch.sqrt(1 - beta2 ** taken).to(torch.float32).to(on.device)
    for name, p in sub.items():
        shape = (-1,) + (1,) * (p.dim() - 1)
        g = grads[name]
        if optimizer == "sgd":
            new = p - lr * g
        else:
            m_all, v_all = moments[name]
            m = m_all if every else m_all.index_select(0, on)
            v = v_all if every else v_all.index_select(0, on)
            m = m.lerp(g, 1 - beta1)
            v = v * beta2 + (1 - beta2) * g * g
            new = p - step_size.view(shape) * m / (v.sqrt() / correction2_sqrt.view(shape) + ADAM_EPS)
            if every:
                m_all.copy_(m), v_all.copy_(v)
            else:
                m_all.index_copy_(0, on, m), v_all.index_copy_(0, on, v)
        if every:
            params[name].copy_(new)
        else:
            params[name].index_copy_(0, on, new)
