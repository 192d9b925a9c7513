"""The models a fog node keeps: one per architecture its devices run.

A fog distills its cross-modal ensemble (``fog.py``) into these models on the
public samples its knowledge bank holds, and a device it asks for work
downloads the model of its planned architecture (tier and sensors) as its
starting point. That way a device asked twice in twenty rounds still starts
from everything its fog has learnt meanwhile, and it spends its battery on
its own data rather than on digesting the fog's targets. What a device
serves is its fog's model of its architecture, as a FedAvg device serves
the global model.

While distilling, the fog also aligns its models' encoders across
modalities on the public pairs (``alignment.py``), through projection heads
sized to each model's tier. Fog compute is the fog's, reported as FLOPs for
the simulated backhaul, never as device energy.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .alignment import alignment_loss, projection_head
from fedkd.distill import kd_loss
from fedkd.architectures import Architecture, new_model
from fedkd.threads import single_threaded
from fedkd.seeding import derive_seed
from fedkd.training import model_device, predict_logits, to_tensors, train_local


class FogModels:
    """Per (fog, architecture): a model, and its projection heads (one per modality it encodes)."""

    def __init__(self, ctx, *, epochs: int = 2, learning_rate: float = 1e-3, temperature: float = 1.0,
                 align_weight: float = 0.1, align_dim: int = 16, batch_size: int = 64,
                 validation: np.ndarray | None = None, pretrain_epochs: int = 0,
                 pretrain_samples: int | None = None, pretrain_pool: np.ndarray | None = None):
        self.check_settings(epochs=epochs, learning_rate=learning_rate, align_weight=align_weight,
                            align_dim=align_dim, batch_size=batch_size)
        self.batch_size = batch_size
        public = ctx.dataset.split("public")
        held = np.zeros(0, np.int64) if validation is None else np.asarray(validation, dtype=np.int64)
        # Labelled public samples never distilled or pretrained on: each model keeps its best epoch on them.
        self.validation = public.subset(held) if len(held) else None
        self._validation_labels = torch.from_numpy(public.labels[held].astype(np.int64))
        # What pretraining may use, in the order labels are handed out (fedkd.labels).
        self._labelled = (np.setdiff1d(np.arange(len(public)), held) if pretrain_pool is None
                          else np.asarray(pretrain_pool, dtype=np.int64))
        self.ctx, self.epochs, self.learning_rate, self.temperature = ctx, epochs, learning_rate, temperature
        self.align_weight, self.align_dim = align_weight, align_dim
        self.pretrain_epochs, self.pretrain_samples = pretrain_epochs, pretrain_samples
        self.models: dict[tuple[int, Architecture], nn.Module] = {}
        self.heads: dict[tuple[int, Architecture], nn.ModuleDict] = {}
        self.fresh_flops: dict[int, float] = {}  # per fog: pretraining done since the last distill

    @staticmethod
    def check_settings(*, epochs: int, learning_rate: float, align_weight: float, align_dim: int,
                       batch_size: int, **_) -> None:
        """Refuse bad settings when the strategy is built, before any data is loaded."""
        if epochs < 0:
            raise ValueError(f"fog_distill_epochs must be 0 or more, got {epochs}")
        if learning_rate <= 0:
            raise ValueError(f"fog_learning_rate must be positive, got {learning_rate}")
        if align_weight < 0:
            raise ValueError(f"align_weight must be 0 or more, got {align_weight}")
        if align_dim < 1:
            raise ValueError(f"align_dim must be positive, got {align_dim}")
        if batch_size < 2:
            raise ValueError(f"fog_batch_size must be 2 or more (alignment contrasts samples), got {batch_size}")

    @property
    def fogs(self) -> int:
        topology = self.ctx.scenario.topology
        return 1 if topology is None else topology.fogs

    def model(self, fog: int, arch: Architecture) -> nn.Module:
        """The fog's model of ``arch``, made on first need: the scenario's initial weights
        (the same in every fog), then, if asked, labelled pretraining on the public set."""
        key = (fog, arch)
        if key not in self.models:
            model = new_model(self.ctx, arch)
            if self.pretrain_epochs > 0:
                labelled = self.ctx.dataset.split("public").subset(self._labelled[:self.pretrain_samples])
                training = self.ctx.scenario.training
                with single_threaded():
                    train_local(model, labelled, arch.modalities, epochs=self.pretrain_epochs,
                                batch_size=training.batch_size, learning_rate=training.learning_rate,
                                seed=derive_seed(self.ctx.scenario.seed, "fog-pretrain", arch.key),
                                optimizer=training.optimizer)
                self.fresh_flops[fog] = self.fresh_flops.get(fog, 0.0) + (
                    self.ctx.train_flops_per_sample(arch.tier, arch.modalities) * len(labelled) * self.pretrain_epochs)
            self.models[key] = model
            # Seeded on the CPU, then placed with the model they align (backend.torch_device).
            self.heads[key] = nn.ModuleDict({
                m: projection_head(arch.tier, self.align_dim,
                                   derive_seed(self.ctx.scenario.seed, "align-head", arch.key, m))
                for m in arch.modalities}).to(model_device(model))
        return self.models[key]

    def architectures(self, fog: int) -> list[Architecture]:
        return sorted(arch for f, arch in self.models if f == fog)

    def distill(self, fog: int, targets: Mapping[Architecture, tuple[np.ndarray, np.ndarray]],
                server_round: int) -> tuple[float, float]:
        """Distill each of the fog's models towards its (public indices, probabilities), all
        at once with the cross-modal alignment on the union of those samples.
        Returns (mean distillation loss, FLOPs spent, pretraining included)."""
        flops = self.fresh_flops.pop(fog, 0.0)
        archs = sorted(a for a in targets if (fog, a) in self.models)
        if not archs or self.epochs == 0:
            return 0.0, flops
        public, batch_size = self.ctx.dataset.split("public"), self.batch_size
        models = [self.models[(fog, a)] for a in archs]
        heads = [self.heads[(fog, a)] for a in archs]
        names = sorted({m for a in archs for m in a.modalities})
        pairs = np.unique(np.concatenate([targets[a][0] for a in archs]))
        device = model_device(models[0])  # cpu or cuda (backend.torch_device); the draws stay on the cpu
        pair_inputs = to_tensors(public.subset(pairs), names, device)
        align = self.align_weight > 0 and len(names) > 1 and len(pairs) > 1
        sets = []
        for arch in archs:
            indices, probs = targets[arch]
            sets.append((to_tensors(public.subset(indices), arch.modalities, device),
                         torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)).to(device)))
        params = [p for m in models for p in m.parameters()]
        if align:
            params += [p for h in heads for p in h.parameters()]
        optimizer = torch.optim.Adam(params, lr=self.learning_rate)
        generator = torch.Generator().manual_seed(derive_seed(self.ctx.scenario.seed, "fog-distill", server_round, fog))
        steps = math.ceil(max(len(t) for _, t in sets) / batch_size)
        total, count = 0.0, 0
        best = [self._checkpoint(model, arch) for model, arch in zip(models, archs)]
        for model in models:
            model.train()
        for _ in range(self.epochs):
            orders = [torch.randperm(len(t), generator=generator) for _, t in sets]
            pair_order = torch.randperm(len(pairs), generator=generator)
            for step in range(steps):
                kd = []
                for model, (inputs, probs), order in zip(models, sets, orders):
                    # A model with fewer targets cycles through them again.
                    idx = order[torch.arange(step * batch_size, (step + 1) * batch_size) % len(order)]
                    kd.append(kd_loss(model({m: x[idx] for m, x in inputs.items()}), probs[idx], self.temperature))
                loss = torch.stack(kd).mean()
                total, count = total + float(loss.detach()), count + 1
                if align:
                    idx = pair_order[torch.arange(step * batch_size, (step + 1) * batch_size) % len(pairs)]
                    aligned = alignment_loss(models, heads, {m: x[idx] for m, x in pair_inputs.items()})
                    if aligned is not None:
                        loss = loss + self.align_weight * aligned
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if self.validation is not None:
                for k, (model, arch) in enumerate(zip(models, archs)):
                    now = self._checkpoint(model, arch)
                    if now[0] > best[k][0]:
                        best[k] = now
        if self.validation is not None:
            for model, (_, state) in zip(models, best):
                model.load_state_dict(state)
        per_epoch = steps * batch_size
        for arch in archs:
            train = self.ctx.train_flops_per_sample(arch.tier, arch.modalities)
            flops += train * per_epoch * self.epochs * (2 if align else 1)  # alignment: one more pass
        return total / max(count, 1), flops

    def _checkpoint(self, model: nn.Module, arch: Architecture) -> tuple[float, dict | None]:
        """(minus the validation cross-entropy, a copy of the weights); (0, None) without validation.

        FedDF's early stopping on labelled public data (Lin et al. 2020): an early,
        biased ensemble would otherwise pull a model onto one class, and every
        device of its architecture would then download that model. The loss
        rather than FedDF's accuracy: a fresh model that predicts one class ties
        on accuracy with every early, still-hesitant improvement and would stay
        put (measured on parking_cams: stuck at 0.506 for 10 rounds at 20 %
        participation); the loss sees the improvement."""
        if self.validation is None:
            return 0.0, None
        logits = predict_logits(model, self.validation, arch.modalities)
        score = -float(F.cross_entropy(logits, self._validation_labels))
        model.train()
        return score, copy.deepcopy(model.state_dict())

    def share_through_cloud(self, fogs: list[int], share: float) -> dict[int, int]:
        """The cloud averages each architecture's models over ``fogs`` (HierFAVG's cloud step,
        Liu et al. 2020, arXiv:1905.06641) and each of those fogs moves ``share`` of the way
        towards that mean. Returns the bytes each fog sends up (and gets back down)."""
        moved: dict[int, int] = {}
        if share == 0:
            return moved
        by_arch: dict[Architecture, list[int]] = {}
        for fog, arch in self.models:
            if fog in fogs:
                by_arch.setdefault(arch, []).append(fog)
        for arch, members in sorted(by_arch.items()):
            if len(members) < 2:
                continue
            states = [self.models[(fog, arch)].state_dict() for fog in members]
            mean = {name: torch.stack([s[name].float() for s in states]).mean(0) for name in states[0]}
            size = sum(t.numel() * t.element_size() for t in states[0].values())
            for fog, state in zip(members, states):
                self.models[(fog, arch)].load_state_dict(
                    {name: (1 - share) * t + share * mean[name] for name, t in state.items()})
                moved[fog] = moved.get(fog, 0) + size
        return moved

    # -- scores and checkpoints ---------------------------------------------------
    def pretrain_indices(self) -> np.ndarray:
        """The labelled public samples pretraining reads (none without pretraining)."""
        return self._labelled[:self.pretrain_samples] if self.pretrain_epochs > 0 else np.zeros(0, np.int64)

    def state(self) -> dict:
        return {f"{fog}|{arch.key}": {"fog": fog, "tier": arch.tier, "modalities": list(arch.modalities),
                                      "model": self.models[(fog, arch)].state_dict(),
                                      "heads": self.heads[(fog, arch)].state_dict(),
                                      "fresh_flops": self.fresh_flops.get(fog, 0.0)}
                for fog, arch in sorted(self.models)}

    def restore(self, state: dict) -> None:
        """The inverse of :meth:`state`."""
        self.models, self.heads, self.fresh_flops = {}, {}, {}
        pretrain, self.pretrain_epochs = self.pretrain_epochs, 0  # restored weights, not fresh ones
        try:
            for saved in state.values():
                fog, arch = int(saved["fog"]), Architecture(saved["tier"], tuple(saved["modalities"]))
                self.model(fog, arch).load_state_dict(saved["model"])
                self.heads[(fog, arch)].load_state_dict(saved["heads"])
                if saved["fresh_flops"]:
                    self.fresh_flops[fog] = float(saved["fresh_flops"])
        finally:
            self.pretrain_epochs = pretrain
