"""Several devices' local training as one batched computation.

Tiny models train far from the hardware's limit one at a time: each step is a
few small kernels, and dispatching them costs more than running them. Devices
of one phase that share an architecture and a training configuration can
instead train together: their parameters stacked along a leading device axis,
one ``torch.func.vmap`` of ``functional_call`` + ``grad`` computing every
device's gradient at once, and a functional optimizer step per device.

Each device keeps what makes its update its own: its samples, its shuffle (the
same seeded ``randperm`` per epoch as :func:`fedkd.training.train_local` and
:func:`fedkd.distill.distill_on`), its step count and its Adam moments. Shards
of unequal size take different numbers of steps: a device with no batch left
sits the step out (only the devices with a batch compute, and only their
parameters and optimizer state change), and a short last batch is padded and
masked, its loss the mean over its real samples.

Two losses, as the one-by-one code has them: cross-entropy on labels
(:func:`train_batched`, FedProx's proximal term optional) and Hinton's
distillation loss towards target probabilities (:func:`distill_states`).

The result equals the one-by-one functions up to float rounding (vmapped
kernels sum in another order): tests/test_batched.py states the tolerance.
The run path (``backend.batch_devices``) groups a phase's device tasks and
calls these through each task's batched form (fedkd.contract.BatchedTask);
what :func:`batchable` refuses goes one by one.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .data.base import Split
from .training import TrainOutcome, model_device

ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, which train_local uses
ADAM_EPS = 1e-8


def batchable(optimizer: str, self_distillation, model: nn.Module | None = None) -> bool:
    """Whether the batched functions do what the one-by-one ones do for these settings
    (and this model: stacked parameters carry no buffers, and dropout would draw
    other random numbers)."""
    if optimizer not in ("adam", "sgd") or self_distillation is not None:
        return False
    if model is None:
        return True
    return not any(True for _ in model.buffers()) and \
        not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())


def train_batched(models: Sequence[nn.Module], data: Sequence[Split], modalities: Sequence[str], *,
                  epochs: int, batch_size: int, learning_rate: float, seeds: Sequence[int],
                  proximal_mu: float = 0.0, optimizer: str = "adam") -> list[TrainOutcome]:
    """Train ``models`` (one architecture, one device each, on ``data``) together, in place:
    :func:`fedkd.training.train_local`'s arguments, one seed per device."""
    weights, outcomes = train_states(models[0], [_parameters(m) for m in models], data, modalities,
                                     epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                     seeds=seeds, proximal_mu=proximal_mu, optimizer=optimizer)
    _load(models, weights)
    return outcomes


def train_states(base: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], data: Sequence[Split],
                 modalities: Sequence[str], *, epochs: int, batch_size: int, learning_rate: float,
                 seeds: Sequence[int], proximal_mu: float = 0.0, optimizer: str = "adam"
                 ) -> tuple[list[dict[str, torch.Tensor]], list[TrainOutcome]]:
    """:func:`train_batched` on weights rather than models: ``base`` gives the architecture
    (its own weights are not used), ``states`` each device's starting parameters. Returns each
    device's trained parameters (views of one stacked tensor per name) and outcomes. One
    model for the whole batch: building a model per device costs as much as its training."""
    targets = [torch.from_numpy(d.labels.astype(np.int64)) for d in data]

    def loss_of(logits, y, mask):
        return (F.cross_entropy(logits, y, reduction="none") * mask).sum() / mask.sum().clamp(min=1)

    weights, losses = _fit(base, states, [d.inputs for d in data], targets, modalities, loss_of, epochs=epochs,
                           batch_size=batch_size, learning_rate=learning_rate, seeds=seeds,
                           proximal_mu=proximal_mu, optimizer=optimizer)
    return weights, [TrainOutcome(len(d), loss) for d, loss in zip(data, losses)]


def distill_states(base: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], data: Split,
                   modalities: Sequence[str], target_probs: np.ndarray, *, epochs: int, batch_size: int,
                   learning_rate: float, temperature: float, seeds: Sequence[int]
                   ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """Distil the ``states`` (one device each, of ``base``'s architecture) together towards
    ``target_probs`` on the shared samples ``data``: :func:`fedkd.distill.distill_on` (Adam,
    T^2 * KL per batch), one seed per device. Returns each device's distilled parameters
    (as :func:`train_states`) and mean loss."""
    targets = torch.from_numpy(np.ascontiguousarray(target_probs, dtype=np.float32))

    def loss_of(logits, y, mask):
        log_student = F.log_softmax(logits / temperature, dim=-1)
        per_sample = F.kl_div(log_student, y, reduction="none").sum(-1)
        return (per_sample * mask).sum() / mask.sum().clamp(min=1) * temperature ** 2

    return _fit(base, states, [data.inputs] * len(states), [targets] * len(states), modalities, loss_of,
                epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seeds=seeds,
                proximal_mu=0.0, optimizer="adam")


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _load(models: Sequence[nn.Module], weights: Sequence[Mapping[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for model, trained in zip(models, weights):
            for name, p in model.named_parameters():
                p.copy_(trained[name])


def _fit(base: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], inputs: Sequence[dict[str, np.ndarray]],
         targets: Sequence[torch.Tensor], modalities: Sequence[str], loss_of: Callable, *, epochs: int,
         batch_size: int, learning_rate: float, seeds: Sequence[int], proximal_mu: float, optimizer: str
         ) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """The shared loop: ``loss_of(logits, targets, mask)`` is one device's loss on one batch."""
    if not states:
        return [], []
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; expected adam or sgd")
    device = model_device(base)
    names = [name for name, _ in base.named_parameters()]
    params = {name: torch.stack([torch.as_tensor(state[name]) for state in states]).to(device, copy=True)
              for name in names}
    anchor = {name: p.clone() for name, p in params.items()} if proximal_mu > 0 else None
    sizes = [len(t) for t in targets]
    width = max(sizes)
    # Inputs padded to the largest device's samples: (devices, samples, ...), targets likewise.
    x_all = {m: torch.stack([_padded(torch.from_numpy(np.ascontiguousarray(x[m])), width) for x in inputs])
             .to(device) for m in modalities}
    y_all = torch.stack([_padded(t, width) for t in targets]).to(device)
    batches = _step_indices(sizes, batch_size, epochs, seeds)
    steps = max(len(b) for b in batches)
    # Every step's sample indices (devices x batch), padded, and which of them are real.
    index = torch.zeros(steps, len(states), batch_size, dtype=torch.int64)
    mask = torch.zeros(steps, len(states), batch_size)
    for i, device_batches in enumerate(batches):
        for step, idx in enumerate(device_batches):
            index[step, i, :len(idx)], mask[step, i, :len(idx)] = idx, 1.0
    active_steps = mask.sum(2) > 0  # (steps, devices): who takes a step
    index, mask = index.to(device), mask.to(device)
    rows = torch.arange(len(states), device=device)[:, None]

    def device_loss(p, x, y, mask, a):
        loss = loss_of(functional_call(base, p, (x,)), y, mask)
        if a is not None:  # FedProx: (mu / 2) * ||w - w_global||^2
            loss = loss + 0.5 * proximal_mu * sum(((p[k] - a[k]) ** 2).sum() for k in p)
        return loss

    grads_and_losses = vmap(grad_and_value(device_loss), in_dims=(0, 0, 0, 0, 0 if anchor is not None else None))
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in params.items()}
    taken = torch.zeros(len(states), dtype=torch.float64)  # optimizer steps per device
    totals = [0.0] * len(states)
    base.train()
    for step in range(steps):
        # Only the devices with a batch left compute: shards differ in size, so late steps
        # have fewer of them.
        on = torch.nonzero(active_steps[step]).flatten()
        every = len(on) == len(states)
        on_dev = on.to(device)
        pick = (lambda t: t) if every else (lambda t: t.index_select(0, on_dev))
        sub = {k: pick(v) for k, v in params.items()}
        who = rows if every else on_dev[:, None]
        picked = index[step] if every else index[step, on_dev]
        x = {m: t[who, picked] for m, t in x_all.items()}
        grads, losses = grads_and_losses(sub, x, y_all[who, picked], pick(mask[step]),
                                         None if anchor is None else {k: pick(v) for k, v in anchor.items()})
        taken[on] += 1
        _apply(params, sub, grads, moments, taken[on], on_dev, every, learning_rate, optimizer)
        for i, loss in zip(on.tolist(), losses.tolist()):
            totals[i] += loss
    weights = [{name: params[name][i] for name in names} for i in range(len(states))]
    return weights, [totals[i] / max(len(batches[i]), 1) for i in range(len(states))]


def _step_indices(sizes: Sequence[int], batch_size: int, epochs: int,
                  seeds: Sequence[int]) -> list[list[torch.Tensor]]:
    """Per device, its batches' sample indices in order: the shuffles the one-by-one code draws."""
    per_device = []
    for n, seed in zip(sizes, seeds):
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            batches.extend(order[start:start + batch_size] for start in range(0, n, batch_size))
        per_device.append(batches)
    return per_device


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
