"""FedDF: FedAvg within each architecture, then ensemble distillation of every architecture on public data.

Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated
Learning", NeurIPS 2020, https://arxiv.org/abs/2006.07242.

An architecture is a model tier *and* a sensor set (a sensor-only mote never
receives a camera encoder; :mod:`fedkd.runtime.architectures` says why).
Each round the server sends every sampled device the global model of its own
architecture (learnt from ``grid.node_profiles``) and the device trains it on
its shard (client task ``train.architecture``). The server then

1. averages the returned weights within each architecture, weighted by
   sample count (FedAvg per architecture);
2. builds the teacher as the paper does: the ensemble of all the round's
   returned device models across architectures, each fed the sensors it has;
   the unweighted mean of their logits (AVGLOGITS) on ``public_batch``
   public samples drawn afresh each round (labels unused), softened at
   ``temperature``;
3. distills every architecture of the population towards the teacher for up
   to ``distill_epochs`` epochs (Adam, ``distill_learning_rate``; fresh each
   epoch), also an architecture none of whose devices took part this round;
4. keeps, per architecture, the epoch that scores best on
   ``validation_samples`` labelled public samples held out of the
   distillation data (the undistilled average counts as epoch 0): the
   paper's early stopping on validation data. Without it (0) an early,
   biased teacher (non-IID devices, a sensor that has not learnt yet) pulls
   every model to one class; fedkd's scenarios showed exactly that.

Distillation is the server's compute, not simulated device time. Scores
(``fedkd_evaluate``) are per architecture on the test split; the headline
weights architectures by how many devices of the population run each. No
federated evaluation is sent.
"""
import copy
from collections import defaultdict
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, validate_message_reply_consistency
from flwr.supercore import log

from fedkd.distill import distill_on, mean_logits, softmax
from fedkd.runtime.architectures import (ArchitectureModels, TRAIN_OWN_ARCHITECTURE, Architecture, new_model,
                                         population_architectures, single_threaded)
from fedkd.seeding import derive_seed, rng_for
from fedkd.training import accuracy, predict_logits

SHARES_WEIGHTS = False  # weights are averaged only within an architecture: any mix of tiers and sensors


class FedDF(ArchitectureModels, FedAvg):
    def __init__(self, public_batch: int = 512, distill_epochs: int = 3, temperature: float = 1.0,
                 distill_learning_rate: float = 1e-3, validation_samples: int = 200, **kwargs):
        if public_batch < 1:
            raise ValueError(f"public_batch must be positive, got {public_batch}")
        if distill_epochs < 0:
            raise ValueError(f"distill_epochs must be 0 or more, got {distill_epochs}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if validation_samples < 0:
            raise ValueError(f"validation_samples must be 0 or more, got {validation_samples}")
        super().__init__(**kwargs)
        self.public_batch, self.distill_epochs = public_batch, distill_epochs
        self.temperature, self.distill_learning_rate = temperature, distill_learning_rate
        self.validation_samples = validation_samples
        self.ctx = None
        self.models = {}  # Architecture -> the global model (torch) of that architecture
        self.devices = {}  # Architecture -> devices of the population that run it
        self._sent = {}  # node id -> the Architecture it was sent this round

    def fedkd_attach_server(self, ctx) -> None:
        """Called by fedkd before round 1: the server's data, and one fresh model per architecture."""
        self.ctx = ctx
        self.devices = population_architectures(ctx)
        self.models = {arch: new_model(ctx, arch) for arch in self.devices}
        # A fixed labelled validation set held out of the public split; the rest is unlabeled distillation data.
        size = len(ctx.dataset.split("public"))
        order = rng_for(ctx.scenario.seed, "feddf-validation").permutation(size)
        held = min(self.validation_samples, size - 1)
        self._validation, self._unlabeled = np.sort(order[:held]), np.sort(order[held:])

    def summary(self) -> None:
        super().summary()
        log(INFO, "\t└──> FedDF: %d architectures, public batch %d, %d distillation epochs, T=%.2f",
            len(self.models), self.public_batch, self.distill_epochs, self.temperature)

    # -- Flower's Strategy API ----------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.ctx is None:
            raise RuntimeError("FedDF needs fedkd_attach_server() with the server's context before round 1")
        sampled = list(super().configure_train(server_round, arrays, config, grid))  # FedAvg's sampling
        nodes = sorted(m.metadata.dst_node_id for m in sampled)
        profiles = grid.node_profiles(nodes)
        self._sent = {node: Architecture.of(profiles[node]) for node in nodes}
        unknown = sorted({a.key for a in self._sent.values()} - {a.key for a in self.models})
        if unknown:
            raise RuntimeError(f"devices registered architectures {unknown} that the population census "
                               f"does not have ({[a.key for a in self.models]})")
        sent_arrays = {arch: ArrayRecord(self.models[arch].state_dict()) for arch in set(self._sent.values())}
        return [Message(RecordDict({self.arrayrecord_key: sent_arrays[self._sent[node]],
                                    self.configrecord_key: config}), node, TRAIN_OWN_ARCHITECTURE)
                for node in nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Architectures differ in their keys: Flower's reply check runs per architecture below.
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        groups = defaultdict(list)
        for reply in valid:
            groups[self._sent[reply.metadata.src_node_id]].append(reply.content)
        for arch, contents in sorted(groups.items()):
            validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=True)
            self.models[arch].load_state_dict(
                aggregate_arrayrecords(contents, self.weighted_by_key).to_torch_state_dict())
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        if self.distill_epochs > 0:
            with single_threaded():
                metrics["distill-loss"] = self.distill(server_round, valid)
        # Several global models, none of them "the" model: the arrays Flower carries stay unused.
        return None, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # scored per architecture on the server (fedkd_evaluate)

    # -- ensemble distillation ----------------------------------------------------
    def teacher(self, server_round: int, replies: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        """This round's public sample indices and the ensemble's probabilities on them."""
        public = self.ctx.dataset.split("public")
        rng = rng_for(self.ctx.scenario.seed, "feddf-public", server_round)
        indices = np.sort(rng.choice(self._unlabeled, min(self.public_batch, len(self._unlabeled)), replace=False))
        batch = public.subset(indices)
        logits = []
        for reply in replies:
            arch = self._sent[reply.metadata.src_node_id]
            model = new_model(self.ctx, arch)
            model.load_state_dict(next(iter(reply.content.array_records.values())).to_torch_state_dict())
            logits.append(predict_logits(model, batch, arch.modalities).numpy())
        return indices, softmax(mean_logits(np.stack(logits), np.ones(len(logits))), self.temperature)

    def distill(self, server_round: int, replies: list[Message]) -> float:
        """Distill every architecture's model towards the ensemble; the mean final loss over architectures.

        With a validation set, each architecture keeps the epoch (the fused
        model before distilling counts as epoch 0) that scores best on it.
        """
        indices, targets = self.teacher(server_round, replies)
        public = self.ctx.dataset.split("public")
        batch, validation = public.subset(indices), public.subset(self._validation)
        losses = []
        for arch, model in sorted(self.models.items()):
            best_score = accuracy(model, validation, arch.modalities) if len(validation) else None
            best_state = copy.deepcopy(model.state_dict())
            for epoch in range(self.distill_epochs):
                loss = distill_on(model, batch, arch.modalities, targets, epochs=1,
                                  batch_size=self.ctx.scenario.training.batch_size,
                                  learning_rate=self.distill_learning_rate, temperature=self.temperature,
                                  seed=derive_seed(self.ctx.scenario.seed, "feddf-distill", server_round,
                                                   arch.key, epoch))
                if best_score is not None:
                    score = accuracy(model, validation, arch.modalities)
                    if score > best_score:
                        best_score, best_state = score, copy.deepcopy(model.state_dict())
            if best_score is not None:
                model.load_state_dict(best_state)
            losses.append(loss)
        return float(np.mean(losses))
