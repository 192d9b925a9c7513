"""Layered self-distillation with auxiliary heads re-initialised each task: a local regularizer any
strategy can switch on, after LSSKD.

Dahri et al., "A Layered Self-Supervised Knowledge Distillation Framework for
Efficient Multimodal Learning on the Edge" (LSSKD), 2025,
https://arxiv.org/abs/2506.07055.

During local training a small linear head hangs on the output of every
convolution block of every encoder, global-average pooled. Each head learns
the labels (cross-entropy) and, in the self-distillation spirit, the softened
output of the next deeper classifier of its encoder; the deepest head learns
from the model's own final classifier. Optionally the mean of the heads'
softened outputs teaches the final classifier back. Teachers are detached:
knowledge flows from deep to shallow, and the heads' cross-entropy reaches the
early layers of the encoders as extra supervision.

With heads h_1..h_K (logits a_k, teacher logits t_k), labels y, final logits z:

    R = mean_k [ CE(a_k, y) + T^2 KL(softmax(t_k / T) || softmax(a_k / T)) ]
        (+ T^2 KL(mean_k softmax(a_k / T) || softmax(z / T))   if ensemble_teaches_final)
    loss = CE(z, y) + weight * R

The heads hang on forward hooks, so the model's modules, its ``state_dict``
and its predictions are untouched, and they are dropped when training ends.

**The heads are re-initialised at random for every task.** Each training
call (one device, one round) builds fresh heads (seeded from the task's
seed), trains them together with the model for that task's local epochs
only, and throws them away; nothing of them travels with the device or the
model, so they never mature across rounds. In LSSKD the auxiliary
classifiers are trained jointly with the network for the whole of training.
Here, at the start of every task the heads are untrained: their
cross-entropy still sends label gradients into the early encoder layers
(deep supervision), but the soft targets they pass to the shallower heads
are weak until they have learnt within the task, so with few local steps the
regularizer is closer to deep supervision than to the paper's mature
self-distillation. fedkd keeps them out of device state because FedAvg-style
devices keep no state between rounds and kept heads would be storage outside
the exchanged model. Their FLOPs are measured and counted.

What fedkd leaves out of the paper: the self-supervised augmented label space
(each head predicting class x input transformation) and any feature-alignment
term; fedkd's encoders are two convolution blocks deep, so there are two heads
per encoder.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .losses import kd_loss
from .models.multimodal import MultimodalNet
from .seeding import derive_seed

_CONVS = (nn.Conv1d, nn.Conv2d)


def self_distillation_loss(final_logits: torch.Tensor, aux_logits: Sequence[torch.Tensor],
                           teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor, *,
                           temperature: float, ensemble_teaches_final: bool = False) -> torch.Tensor:
    """The regularizer R above (unweighted); ``teacher_logits[k]`` teaches ``aux_logits[k]``."""
    if len(aux_logits) != len(teacher_logits) or not aux_logits:
        raise ValueError("expected one teacher per auxiliary head, and at least one head")
    per_head = [F.cross_entropy(a, labels)
                + kd_loss(a, F.softmax(t.detach() / temperature, dim=-1), temperature)
                for a, t in zip(aux_logits, teacher_logits)]
    loss = torch.stack(per_head).mean()
    if ensemble_teaches_final:
        ensemble = torch.stack([F.softmax(a.detach() / temperature, dim=-1) for a in aux_logits]).mean(0)
        loss = loss + kd_loss(final_logits, ensemble, temperature)
    return loss


def tap_points(encoder: nn.Sequential) -> list[tuple[int, int]]:
    """(index of the module whose output is tapped, its channels): the activation
    after each convolution, or the convolution itself when none follows."""
    taps = []
    modules = list(encoder)
    for i, module in enumerate(modules):
        if isinstance(module, _CONVS):
            follows = i + 1 < len(modules) and not isinstance(modules[i + 1], (*_CONVS, nn.Linear))
            taps.append((i + 1 if follows else i, module.out_channels))
    return taps


@lru_cache(maxsize=64)
def head_train_flops(in_features: int, num_classes: int) -> int:
    """FLOPs of one head's forward and backward for one sample, by torch's counter."""
    head = nn.Linear(in_features, num_classes)
    features = torch.zeros(1, in_features, requires_grad=True)  # a tap inside the graph needs its grad
    with FlopCounterMode(display=False) as counter:
        head(features).sum().backward()
    return counter.get_total_flops()


class AuxiliaryHeads(nn.Module):
    """Linear heads on the pooled outputs of each encoder's convolution blocks.

    Not a submodule of the model: they never enter its ``state_dict``. Attach
    them (``with heads.attached():``) for the forward passes they learn from.
    Built fresh, at random from ``seed``, for each training task and discarded
    after it (see the module's docstring).
    """

    def __init__(self, model: MultimodalNet, seed: int):
        super().__init__()
        num_classes = model.head.out_features
        self._taps: dict[str, list[tuple[str, nn.Module]]] = {}
        heads = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "aux-heads"))
            for modality, encoder in model.encoders.items():
                self._taps[modality] = []
                for stage, (index, channels) in enumerate(tap_points(encoder)):
                    key = f"{modality}_{stage}"
                    heads[key] = nn.Linear(channels, num_classes)
                    self._taps[modality].append((key, encoder[index]))
        self.heads = nn.ModuleDict(heads)
        self._features: dict[str, torch.Tensor] = {}

    @contextmanager
    def attached(self) -> Iterator["AuxiliaryHeads"]:
        hooks = [module.register_forward_hook(self._keeper(key))
                 for taps in self._taps.values() for key, module in taps]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()
            self._features.clear()

    def _keeper(self, key: str):
        def keep(module: nn.Module, inputs, output: torch.Tensor) -> None:
            self._features[key] = output.flatten(2).mean(-1)  # global average pool: (batch, channels)

        return keep

    def regularizer(self, final_logits: torch.Tensor, labels: torch.Tensor, spec) -> torch.Tensor:
        """weight * R for the last forward pass; ``spec`` has weight, temperature, ensemble_teaches_final."""
        aux, teachers = [], []
        for taps in self._taps.values():
            chain = [self.heads[key](self._features[key]) for key, _ in taps if key in self._features]
            if not chain:
                continue  # this encoder did not run: the device lacks the modality
            aux += chain
            teachers += chain[1:] + [final_logits]  # each head learns from the next deeper classifier
        self._features.clear()
        return spec.weight * self_distillation_loss(
            final_logits, aux, teachers, labels, temperature=spec.temperature,
            ensemble_teaches_final=getattr(spec, "ensemble_teaches_final", False))

    def train_flops_per_sample(self, modalities: Sequence[str]) -> int:
        """The heads' extra FLOPs per training sample fed with ``modalities``.

        Gradients from the heads join the encoder's own backward pass, so the
        heads' forward and backward is all they add.
        """
        return sum(head_train_flops(self.heads[key].in_features, self.heads[key].out_features)
                   for m in modalities if m in self._taps for key, _ in self._taps[m])
