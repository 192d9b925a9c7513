"""FD: devices exchange per-class average logits, no public data (Jeong et al. 2018).

Jeong, Oh, Kim, Bennis & Kim, "Communication-Efficient On-Device Machine
Learning: Federated Distillation and Augmentation under Non-IID Private
Data", NeurIPS 2018 Workshop on Machine Learning on the Phone and other
Consumer Devices (MLPCD), https://arxiv.org/abs/1811.11479. Algorithm 1
("federated distillation") is followed; the augmentation half of the paper
(FAug, a GAN trained at the server) is not.

What is followed:

- Each device keeps its own model (any tier, its own sensors, kept in its
  travelling state under its ``fedkd.device_models`` key) and trains it on
  its shard with cross-entropy plus ``beta`` times a distillation regulariser
  towards the global average logit vector *of the sample's label* (the
  paper's per-label "global-average logit"). The regulariser is Hinton's KD
  loss, T^2 * KL(softmax(g_label / T) || softmax(z / T)), which has the
  gradient of the paper's cross-entropy towards the softened global logits;
  its per-batch value is the sum over the samples whose label has a global
  logit, divided by the batch size, so a sample without a target adds
  nothing (the paper's loss is per sample).
- While it trains, the device accumulates the logits its model outputs in
  each training forward pass (raw logits, before the optimizer step of that
  batch, no temperature), per true label, over every epoch of the task, as
  Algorithm 1's "local-average logit" does. It uploads their per-label mean
  (a C x C matrix, row l = mean logits of the samples labelled l, a zero row
  for a label it does not hold) through the logit ``codec`` and the number of
  its samples of each label (C floats through the lossless ``fp32`` codec:
  int8 or top-k would corrupt counts). Both are real payload.
- The server sums the uploads per label, weighted by the counts; the paper's
  rule (Algorithm 1, global ensembling) then removes each device's own
  contribution from the target it sends back: a device that reported in the
  latest aggregated round gets, for each label l, the count-weighted mean of
  the *other* devices' logits of l ((S_l - n_il F_il) / (N_l - n_il)); any
  other device gets the mean over all of them. ``exclude_own: false``
  switches the exclusion off.

Where fedkd departs, and why:

- Weighting: the paper divides by M - 1 (all M devices hold every label);
  under fedkd's Dirichlet label skew devices hold a label with very
  different counts or not at all, so the mean is weighted by the devices'
  sample counts of that label (a device without the label does not count).
- Partial participation: the paper's devices all report every round; here a
  ``fraction_train`` sample does. The targets of round t + 1 come from the
  devices that replied in round t; a label none of them holds keeps its last
  global logit (so it is not forgotten). The own-contribution rule applies to
  the latest round's contributions only.
- Heterogeneous sensors and tiers need no change: the exchange is C x C per
  device whatever its model.
- Optimizer: fedkd's (``training.optimizer``, Adam by default, fresh each
  task), not the paper's SGD. ``training.self_distillation`` is not applied
  (FD's own loss replaces ``train_local``).

The device's work runs where its model is (``backend.torch_device``, as
``fedkd.training``): its samples, labels, targets and sums follow the model,
shuffles are drawn on the CPU (a GPU run sees the same batches) and the upload
comes back through the CPU.

Scored on each device's own model (fedkd's default for strategies whose
devices keep models).
"""
from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedkd.codecs import decode_any, get_codec
from fedkd.contract import DeviceCall, FedkdStrategy, StrategyEnv
from fedkd.device_models import device_model, model_key, pack
from fedkd.distill import kd_loss, softmax
from fedkd.strategy_parts import NoClientEvaluation, check_sampling, sample_devices, weighted_reply_metrics
from fedkd.training import model_device, to_tensors

MESSAGE_TYPE = "train.fd"
COUNTS_CODEC = "fp32"  # counts must arrive exact whatever the logit codec


# -- the device's half -------------------------------------------------------------
def fd_loss(logits: torch.Tensor, labels: torch.Tensor, target_probs: torch.Tensor | None,
            has_target: torch.Tensor | None, beta: float, temperature: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, distillation term) of one batch: mean cross-entropy plus ``beta`` times the KD
    loss towards the global probabilities of each sample's label, summed over the samples
    whose label has a target and divided by the batch size."""
    ce = F.cross_entropy(logits, labels)
    if target_probs is None:
        return ce, logits.new_zeros(())
    mask = has_target[labels]
    if not bool(mask.any()):
        return ce, logits.new_zeros(())
    # kd_loss averages over the rows it gets; rescale to a per-sample sum over the whole batch.
    distill = kd_loss(logits[mask], target_probs[labels[mask]], temperature) * (mask.sum() / len(labels))
    return ce + beta * distill, distill


def global_targets(config, num_classes: int, temperature: float, device: torch.device | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The server's per-label targets in a task's ``config``, on ``device`` (else the CPU): the
    softened global logits (C x C probabilities) and which labels have one; (None, None) before
    the server has any."""
    if "targets" not in config:
        return None, None
    global_logits = decode_any(bytes(config["targets"])).astype(np.float64)
    target_counts = decode_any(bytes(config["target-counts"]))
    if global_logits.shape != (num_classes, num_classes) or target_counts.shape != (num_classes,):
        raise ValueError(f"expected {num_classes}x{num_classes} global logits and {num_classes} counts, "
                         f"got {global_logits.shape} and {target_counts.shape}")
    target_probs = torch.from_numpy(softmax(global_logits, temperature).astype(np.float32))
    has_target = torch.from_numpy(target_counts > 0)
    return (target_probs, has_target) if device is None else (target_probs.to(device), has_target.to(device))


def fd_task(call: DeviceCall) -> Message:
    """``train.fd``: train the device's own model with CE + beta * distillation towards the
    global per-label logits; upload the per-label mean of the logits seen while training."""
    ctx, device = call.ctx, call.device
    config = call.config()
    training = call.scenario.training
    tier, modalities = device.model_tier, device.modalities
    key = model_key(tier, modalities)
    num_classes = ctx.dataset.num_classes
    temperature, beta = float(config["temperature"]), float(config["beta"])
    model = device_model(ctx, call.device_id, tier, modalities, call.state)
    where = model_device(model)  # cpu or cuda (backend.torch_device); the draws stay on the cpu
    target_probs, has_target = global_targets(config, num_classes, temperature, where)
    epochs = int(config.get("local-epochs", training.local_epochs))
    inputs = to_tensors(device.data, modalities, where)
    labels = torch.from_numpy(device.data.labels.astype(np.int64)).to(where)
    optimizer = (torch.optim.Adam if training.optimizer == "adam" else torch.optim.SGD)(
        model.parameters(), lr=training.learning_rate)
    generator = torch.Generator().manual_seed(call.seed("fd", call.server_round, call.device_id))
    logit_sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=where)
    seen = torch.zeros(num_classes, dtype=torch.float64, device=where)
    total, total_distill, batches = 0.0, 0.0, 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(where)
        for start in range(0, len(labels), training.batch_size):
            idx = order[start:start + training.batch_size]
            logits = model({m: x[idx] for m, x in inputs.items()})
            # Algorithm 1: the local-average logit accumulates the training pass's outputs.
            logit_sums.index_add_(0, labels[idx], logits.detach().double())
            seen += torch.bincount(labels[idx], minlength=num_classes).double()
            loss, distill = fd_loss(logits, labels[idx], target_probs, has_target, beta, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, total_distill = total + float(loss.detach()), total_distill + float(distill.detach())
            batches += 1
    means = (logit_sums / seen.clamp_min(1.0)[:, None]).cpu().numpy()
    counts = np.bincount(device.data.labels.astype(np.int64), minlength=num_classes).astype(np.float32)
    flops = ctx.train_flops_per_sample(tier, modalities) * len(labels) * epochs
    return call.reply({
        "fd": ConfigRecord({"logits": get_codec(str(config["codec"])).encode(means),
                            "counts": get_codec(COUNTS_CODEC).encode(counts)}),
        "metrics": MetricRecord({"num-examples": len(labels), "train-loss": total / max(batches, 1),
                                 "distill-loss": total_distill / max(batches, 1)}),
    }, flops, state=pack(call.state, key, model.state_dict()))


# -- the server's half: pure functions, worked by hand in tests/test_fd.py --------------
def label_sums(means: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Count-weighted sums of the devices' per-label mean logits (devices, C, C) and the
    counts behind them: (S, N) with S_l = sum_i n_il F_il, N_l = sum_i n_il."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.einsum("dl,dlc->lc", counts, np.asarray(means, dtype=np.float64)), counts.sum(axis=0)


def targets_for(sums: np.ndarray, totals: np.ndarray, own_means: np.ndarray | None = None,
                own_counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The per-label global logits a device gets and the counts behind each row (0: no target),
    without the device's own contribution when it is given (the paper's rule)."""
    sums, totals = np.array(sums, dtype=np.float64), np.array(totals, dtype=np.float64)
    if own_means is not None:
        own = np.asarray(own_counts, dtype=np.float64)
        sums -= own[:, None] * np.asarray(own_means, dtype=np.float64)
        totals -= own
    # Float subtraction may leave dust where only the device held the label.
    totals = np.where(totals > 0.5, totals, 0.0)
    means = np.divide(sums, totals[:, None], out=np.zeros_like(sums), where=totals[:, None] > 0)
    return means, totals


class FD(FedkdStrategy, NoClientEvaluation, Strategy):
    """Federated Distillation: devices exchange per-class average logits, no public data (Jeong et al. 2018)."""

    shares_weights = False
    device_tasks = {MESSAGE_TYPE: fd_task}

    def __init__(self, fraction_train: float = 0.1, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 beta: float = 1.0, temperature: float = 1.0, exclude_own: bool = True, codec: str = "fp32",
                 downlink_codec: str | None = None, local_epochs: int | None = None):
        """``beta``: weight of the distillation regulariser (the paper leaves it open; 1 weighs it
        as the cross-entropy); ``temperature``: softening of the global logits; ``exclude_own``:
        leave a device's own latest contribution out of its target (the paper's rule);
        ``codec``/``downlink_codec``: how the per-class logits travel up / down."""
        check_sampling(fraction_train, min_train_nodes, min_available_nodes)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if local_epochs is not None and local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1 or null, got {local_epochs}")
        get_codec(codec), get_codec(downlink_codec or codec)  # fail now on a bad codec name
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.beta, self.temperature, self.exclude_own = float(beta), float(temperature), bool(exclude_own)
        self.codec, self.downlink_codec = codec, downlink_codec or codec
        self.local_epochs = local_epochs
        self.num_classes: int | None = None
        # The global estimate: per-label count-weighted sums of logits and their counts.
        self.sums: np.ndarray | None = None
        self.totals: np.ndarray | None = None
        # The latest aggregated round's contributions, to leave each device's own out.
        self.contributions: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- fedkd hooks ------------------------------------------------------------
    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before round 1: how many classes the run has."""
        super().fedkd_setup(env)
        self.num_classes = env.public.num_classes

    def fedkd_state(self) -> dict:
        """The global sums and counts and the latest round's contributions, for checkpoints."""
        ids = sorted(self.contributions)
        return {"sums": self.sums, "totals": self.totals, "contributors": np.array(ids, dtype=np.int64),
                "own_means": [self.contributions[i][0] for i in ids],
                "own_counts": [self.contributions[i][1] for i in ids]}

    def fedkd_restore(self, state: dict) -> None:
        self.sums, self.totals = state["sums"], state["totals"]
        self.contributions = {int(i): (np.asarray(m), np.asarray(c)) for i, m, c in
                              zip(state["contributors"], state["own_means"], state["own_counts"])}

    # -- Flower's Strategy API --------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> FD: fraction %.2f, beta %.2f, T=%.2f, codec %s/%s, exclude own %s", self.fraction_train,
            self.beta, self.temperature, self.codec, self.downlink_codec, self.exclude_own)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = sample_devices(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        task = {"server-round": server_round, "beta": self.beta, "temperature": self.temperature,
                "codec": self.codec}
        if self.local_epochs is not None:
            task["local-epochs"] = int(self.local_epochs)
        return [Message(RecordDict({"config": ConfigRecord({**task, **self._targets_of(node)})}), node, MESSAGE_TYPE)
                for node in sorted(node_ids)]

    def _targets_of(self, node: int) -> dict:
        """The encoded global logits (and their counts) ``node`` gets; nothing before the first aggregate."""
        if self.sums is None:
            return {}
        own = self.contributions.get(node) if self.exclude_own else None
        means, totals = targets_for(self.sums, self.totals, *(own or (None, None)))
        return {"targets": get_codec(self.downlink_codec).encode(means.astype(np.float32)),
                "target-counts": get_codec(COUNTS_CODEC).encode(totals.astype(np.float32))}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        contributions = {r.metadata.src_node_id: (decode_any(bytes(r.content["fd"]["logits"])).astype(np.float64),
                                                  decode_any(bytes(r.content["fd"]["counts"])).astype(np.float64))
                         for r in valid}
        self.merge(contributions)
        return None, weighted_reply_metrics(valid, "train-loss")

    def merge(self, contributions: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Take a round's per-label means and counts (by device) into the global estimate: the
        labels they cover get this round's count-weighted means, the others keep the last ones."""
        c = self.num_classes
        for device, (means, counts) in contributions.items():
            if means.shape != (c, c) or counts.shape != (c,):
                raise ValueError(f"device {device} sent {means.shape} logits and {counts.shape} counts, "
                                 f"expected {(c, c)} and {(c,)}")
        ids = sorted(contributions)
        sums, totals = label_sums(np.stack([contributions[i][0] for i in ids]),
                                  np.stack([contributions[i][1] for i in ids]))
        if self.sums is None:
            self.sums, self.totals = np.zeros((c, c)), np.zeros(c)
        covered = totals > 0
        self.sums, self.totals = self.sums.copy(), self.totals.copy()
        self.sums[covered], self.totals[covered] = sums[covered], totals[covered]
        self.contributions = {i: contributions[i] for i in ids}
