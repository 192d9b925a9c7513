"""FedDF: FedAvg within each architecture, then ensemble distillation of every architecture on public data.

Lin et al., "Ensemble Distillation for Robust Model Fusion in Federated
Learning", NeurIPS 2020, https://arxiv.org/abs/2006.07242.

An architecture is a model tier *and* a sensor set (a sensor-only mote never
receives a camera encoder; :mod:`fedkd.architectures` says why).
Each round the server sends every sampled device the global model of its own
architecture (learnt from ``grid.node_profiles``) and the device trains it on
its shard (client task ``train.architecture``). The server then

1. averages the returned weights within each architecture, weighted by
   sample count (FedAvg per architecture);
2. builds the teacher as the paper does: the ensemble of all the round's
   returned device models across architectures, each fed the sensors it has;
   the unweighted mean of their logits (AVGLOGITS) on ``public_batch``
   unlabelled public samples drawn afresh each round, softened at
   ``temperature``;
3. distills every architecture of the population towards the teacher, also
   an architecture none of whose devices took part this round, as the paper
   does: Adam (``distill_learning_rate``, one optimizer for the whole
   distillation), mini-batches of ``distill_batch_size`` drawn from the
   round's public samples (reshuffled after each pass), for up to
   ``distill_steps`` steps;
4. stops early on ``validation_samples`` labelled public samples: the model
   is scored before the first step and every ``eval_every`` steps (and after
   the last); distillation stops once more than ``patience`` steps have passed
   since the best check, and the best check's weights are kept (the fused
   model before distilling is a check too, so a round whose distillation only
   hurts keeps the FedAvg result). A check is better when its validation
   accuracy is higher or, at equal accuracy, its validation cross-entropy is
   lower: accuracy alone ties for a fresh model predicting one class and every
   early, still-hesitant improvement, and would stop there. Without
   validation samples (0) every step runs and the last weights stay; an
   early, biased teacher (non-IID devices, a sensor that has not learnt yet)
   then pulls every model to one class, which fedkd's scenarios showed.

The labelled samples are the run's first ``validation_samples`` of
:mod:`fedkd.labels` (the same ones every strategy with that label budget
reads), held out of the distillation pool; ``fedkd_labels_read`` reports them.

**Defaults and why.** The paper distills with Adam at 1e-3 on batches of 128
for up to 10^4 steps with early stopping on validation data; fedkd keeps the
optimizer, learning rate and batch size and scales the budget for a CPU and
for public sets of hundreds to a few thousand samples: ``distill_steps=500``
(125 passes over the default 512-sample round batch, many more than the
distillation converges in on fedkd's datasets, so the budget rarely binds
before the patience does), ``eval_every=20`` (25 checks at most; one check is
a forward pass over the 200 validation samples, about a step's cost), and
``patience=100`` steps (5 checks: with 200 validation samples one check's
accuracy moves in steps of 0.5 %, so a single check without progress is
noise, five are a plateau). ``distill_epochs`` (None) is the older way to
give the budget, in passes over the round's public samples; when given it
replaces ``distill_steps``. Either at 0 switches distillation off (FedAvg per
architecture).

Distillation is the server's compute, not simulated device time. Scores are
per architecture on the test split (the evaluation panel runs its
architecture's model). No federated evaluation is sent.
"""
import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, validate_message_reply_consistency
from flwr.supercore import log

from fedkd.contract import StrategyEnv
from fedkd.data.base import Split
from fedkd.distill import kd_loss, mean_logits, softmax
from fedkd.labels import labelled_public, unlabelled_public
from fedkd.architectures import ArchitectureModels, TRAIN_OWN_ARCHITECTURE, Architecture, new_model
from fedkd.threads import single_threaded
from fedkd.seeding import derive_seed, rng_for
from fedkd.strategy_parts import NoClientEvaluation
from fedkd.training import model_device, predict_logits, to_tensors



@dataclass(frozen=True)
class PatienceRun:
    """How one early-stopped training went."""

    steps: int  # steps taken
    best_step: int  # the check whose weights were kept (0: the model as it came)
    checks: tuple[tuple[int, Any], ...]  # (step, score) of every check, the first at step 0
    mean_loss: float  # over the steps taken; nan if none


def train_with_patience(model: torch.nn.Module, step: Callable[[], float], score: Callable[[], Any] | None, *,
                        steps: int, eval_every: int, patience: int) -> PatienceRun:
    """Up to ``steps`` calls of ``step()`` (one optimisation step of ``model``, returning its loss).

    With ``score`` (higher is better; any comparable value, e.g. a tuple), the
    model is scored before the first step, after every ``eval_every`` steps
    and after the last; a check counts as better only if its score is strictly
    higher than the best so far. Training stops at the first check more than
    ``patience`` steps after the best one, and ``model`` ends with the best
    check's weights. Without ``score`` every step runs and the last weights stay.

    E.g. ``eval_every=20``, ``patience=40`` and scores 0.5, 0.6, 0.55, 0.55,
    0.55 at steps 0, 20, 40, 60, 80: at step 80 the best (step 20) is 60 > 40
    steps old, so training stops after 80 steps with the weights of step 20.
    """
    losses: list[float] = []
    if score is None:
        losses = [step() for _ in range(steps)]
        return PatienceRun(steps, steps, (), float(np.mean(losses)) if losses else math.nan)
    best = score()
    checks = [(0, best)]
    best_step, best_state = 0, copy.deepcopy(model.state_dict())
    while len(losses) < steps:
        losses.append(step())
        taken = len(losses)
        if taken % eval_every and taken < steps:
            continue
        now = score()
        checks.append((taken, now))
        if now > best:
            best, best_step, best_state = now, taken, copy.deepcopy(model.state_dict())
        elif taken - best_step > patience:
            break
    model.load_state_dict(best_state)
    return PatienceRun(len(losses), best_step, tuple(checks), float(np.mean(losses)) if losses else math.nan)


class FedDF(ArchitectureModels, NoClientEvaluation, FedAvg):
    def __init__(self, public_batch: int = 512, distill_steps: int = 500, patience: int = 100,
                 eval_every: int = 20, distill_batch_size: int = 128, temperature: float = 1.0,
                 distill_learning_rate: float = 1e-3, validation_samples: int = 200,
                 distill_epochs: int | None = None, **kwargs):
        if public_batch < 1:
            raise ValueError(f"public_batch must be positive, got {public_batch}")
        if distill_steps < 0:
            raise ValueError(f"distill_steps must be 0 or more, got {distill_steps}")
        if distill_epochs is not None and distill_epochs < 0:
            raise ValueError(f"distill_epochs must be 0 or more, got {distill_epochs}")
        if patience < 0:
            raise ValueError(f"patience must be 0 or more steps, got {patience}")
        if eval_every < 1:
            raise ValueError(f"eval_every must be positive, got {eval_every}")
        if distill_batch_size < 1:
            raise ValueError(f"distill_batch_size must be positive, got {distill_batch_size}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if validation_samples < 0:
            raise ValueError(f"validation_samples must be 0 or more, got {validation_samples}")
        super().__init__(**kwargs)
        self.public_batch, self.distill_steps, self.distill_epochs = public_batch, distill_steps, distill_epochs
        self.patience, self.eval_every, self.distill_batch_size = patience, eval_every, distill_batch_size
        self.temperature, self.distill_learning_rate = temperature, distill_learning_rate
        self.validation_samples = validation_samples
        self.ctx = None
        self.models = {}  # Architecture -> the global model (torch) of that architecture
        self.devices = {}  # Architecture -> devices of the population that run it
        self._sent = {}  # node id -> the Architecture it was sent this round
        self._validation = np.zeros(0, dtype=np.int64)  # labelled public samples (fedkd.labels)
        self._unlabeled = np.zeros(0, dtype=np.int64)  # the rest of the public split: distillation data

    @property
    def distills(self) -> bool:
        return (self.distill_steps if self.distill_epochs is None else self.distill_epochs) > 0

    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before round 1: the server's data, one fresh model per architecture, and which
        public samples validate."""
        super().fedkd_setup(env)
        ctx = env.ctx
        # The run's first labelled public samples validate; the rest is unlabelled distillation data
        # (at least one sample stays unlabelled).
        size = len(ctx.dataset.split("public"))
        held = max(0, min(self.validation_samples, size - 1))
        self._validation = labelled_public(ctx.scenario.seed, size, held)
        self._unlabeled = unlabelled_public(ctx.scenario.seed, size, held)

    def fedkd_labels_read(self) -> dict[str, np.ndarray]:
        """{purpose: the public samples whose labels FedDF reads}: its validation set, if any."""
        return {"validation": self._validation.copy()} if len(self._validation) else {}

    def summary(self) -> None:
        super().summary()
        budget = (f"{self.distill_steps} steps" if self.distill_epochs is None
                  else f"{self.distill_epochs} passes")
        log(INFO, "\t└──> FedDF: %d architectures, public batch %d, distillation up to %s (batch %d, "
            "patience %d steps on %d validation samples), T=%.2f", len(self.models), self.public_batch, budget,
            self.distill_batch_size, self.patience, len(self._validation), self.temperature)

    # -- Flower's Strategy API ----------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.ctx is None:
            raise RuntimeError("FedDF needs fedkd_setup() with the server's context before round 1")
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
        if self.distills:
            with single_threaded():
                runs = self.distill(server_round, valid)
            metrics["distill-loss"] = float(np.nanmean([r.mean_loss for r in runs.values()]))
            metrics["distill-steps"] = float(np.mean([r.steps for r in runs.values()]))
        # Several global models, none of them "the" model: the arrays Flower carries stay unused.
        return None, metrics

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

    def distill(self, server_round: int, replies: list[Message]) -> dict[Architecture, PatienceRun]:
        """Distill every architecture's model towards the ensemble, each early-stopped on the
        validation samples (see the module's docstring); how each went, by architecture."""
        indices, targets = self.teacher(server_round, replies)
        public = self.ctx.dataset.split("public")
        pool, validation = public.subset(indices), public.subset(self._validation)
        return {arch: self._distill_one(model, arch, pool, targets, validation, server_round)
                for arch, model in sorted(self.models.items())}

    def _distill_one(self, model: torch.nn.Module, arch: Architecture, pool: Split, targets: np.ndarray,
                     validation: Split, server_round: int) -> PatienceRun:
        where = model_device(model)  # backend.torch_device: batches go where the model is
        inputs = to_tensors(pool, arch.modalities, where)
        soft = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).to(where)
        batch = min(self.distill_batch_size, len(soft))
        steps = (self.distill_steps if self.distill_epochs is None
                 else self.distill_epochs * math.ceil(len(soft) / batch))
        optimizer = torch.optim.Adam(model.parameters(), lr=self.distill_learning_rate)
        generator = torch.Generator().manual_seed(
            derive_seed(self.ctx.scenario.seed, "feddf-distill", server_round, arch.key))
        order, at = torch.randperm(len(soft), generator=generator), 0

        def step() -> float:
            nonlocal order, at
            if at + batch > len(order):  # a new pass over the round's samples
                order, at = torch.randperm(len(soft), generator=generator), 0
            idx = order[at:at + batch].to(where)  # drawn on the CPU: the same batches on a GPU
            at += batch
            model.train()
            loss = kd_loss(model({m: x[idx] for m, x in inputs.items()}), soft[idx], self.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        score = None
        if len(validation):
            labels = torch.from_numpy(validation.labels.astype(np.int64))

            def score() -> tuple[float, float]:
                logits = predict_logits(model, validation, arch.modalities)
                correct = float((logits.argmax(1) == labels).double().mean())
                return correct, -float(F.cross_entropy(logits, labels))

        return train_with_patience(model, step, score, steps=steps, eval_every=self.eval_every,
                                   patience=self.patience)
