"""FedProto: devices exchange class prototypes (mean features), no public data (Tan et al. 2022).

Tan, Long, Liu, Zhou, Lu, Jiang & Zhang, "FedProto: Federated Prototype
Learning across Heterogeneous Clients", AAAI 2022,
https://arxiv.org/abs/2105.00243.

What is followed:

- Each device keeps its own model (any tier, its own sensors, kept in its
  travelling state under its ``fedkd.device_models`` key) and trains it on
  its shard with the paper's local objective: cross-entropy plus ``lam``
  times the distance between the embedding of each sample (the model's
  feature, ``MultimodalNet.features``: the fused encoder output fed to the
  linear head) and the global prototype of its class. The distance is the
  mean squared error over the batch's samples and feature dimensions, as the
  authors' code computes it (``nn.MSELoss`` on the batch's features, a
  sample whose class has no global prototype counting as zero error).
- After local training the device computes its local prototypes, the mean
  feature per class over its shard with the trained model (the paper's
  C_i^(j); one extra forward pass over the shard, whose FLOPs are counted),
  and uploads them (a C x d matrix, a zero row for a class it does not hold)
  through ``codec`` with its sample count per class (C floats through the
  lossless ``fp32`` codec). Both are real payload. The authors' code
  averages the features seen during training instead; the paper's
  definition is used here.
- The server's global prototype of class j is the count-weighted mean of the
  local prototypes of the devices that hold j (the paper's aggregation,
  weighted by |D_i,j|). Each device gets the global prototypes next time it
  is sampled.

Where fedkd departs, and why:

- Heterogeneous models: the paper's clients share the embedding size. In
  fedkd the feature dimension is set by the model tier (``tiny`` 16,
  ``small`` 32, ``base`` 64; sensors do not change it). Prototypes are
  grouped by feature dimension: devices of one dimension exchange
  prototypes with each other only. ``parking_cams`` and ``av_digits`` use one
  tier (``small``), so there is one group there.
- Partial participation: the global prototypes of round t + 1 come from the
  devices that replied in round t; a class none of them holds keeps its last
  global prototype.
- Inference: scored, as every strategy whose devices keep models, with each
  device's own model's classifier (fedkd's panel). With
  ``proto_accuracy: true`` (default) a column ``accuracy_proto`` adds the
  paper's inference: each panel device assigns a test sample to the class of
  the nearest (Euclidean) global prototype of its group.
- Optimizer: fedkd's (``training.optimizer``, Adam by default, fresh each
  task); ``training.self_distillation`` is not applied.

Work runs where the model is (``backend.torch_device``, as ``fedkd.training``):
samples, labels, prototypes and sums follow the model, shuffles are drawn on
the CPU (a GPU run sees the same batches) and what goes back to numpy comes
through the CPU.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

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
from fedkd.scoring import evaluation_panel, own_model
from fedkd.strategy_parts import NoClientEvaluation, check_sampling, sample_devices, weighted_reply_metrics
from fedkd.training import model_device, to_tensors

MESSAGE_TYPE = "train.fedproto"
COUNTS_CODEC = "fp32"  # counts must arrive exact whatever the prototype codec


# -- the device's half -------------------------------------------------------------
def proto_loss(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
               prototypes: torch.Tensor | None, has_proto: torch.Tensor | None, lam: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, prototype term) of one batch: cross-entropy plus ``lam`` times the mean squared
    error between each sample's feature and its class's global prototype (a sample whose class
    has none is its own target: zero error, still counted in the mean, as the authors' code)."""
    ce = F.cross_entropy(logits, labels)
    if prototypes is None:
        return ce, logits.new_zeros(())
    known = has_proto[labels][:, None]
    target = torch.where(known, prototypes[labels], features.detach())
    distance = F.mse_loss(features, target)
    return ce + lam * distance, distance


@torch.no_grad()
def local_prototypes(model, data, modalities, num_classes: int, batch_size: int = 1024
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(C x d mean feature per class, C counts) of ``data`` under ``model``; zero rows for absent classes."""
    model.eval()
    where = model_device(model)
    inputs = to_tensors(data, modalities, where)
    labels = torch.from_numpy(data.labels.astype(np.int64)).to(where)
    sums = torch.zeros(num_classes, model.feature_dim, dtype=torch.float64, device=where)
    for start in range(0, len(labels), batch_size):
        features = model.features({m: x[start:start + batch_size] for m, x in inputs.items()})
        sums.index_add_(0, labels[start:start + batch_size], features.double())
    counts = torch.bincount(labels, minlength=num_classes).double()
    return (sums / counts.clamp_min(1.0)[:, None]).cpu().numpy(), counts.cpu().numpy()


def global_prototypes(config, num_classes: int, feature_dim: int, device: torch.device | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The global prototypes in a task's ``config`` (C x ``feature_dim``) and which classes have
    one, on ``device`` (else the CPU); (None, None) when the server sent none."""
    if "prototypes" not in config:
        return None, None
    protos = decode_any(bytes(config["prototypes"]))
    proto_counts = decode_any(bytes(config["prototype-counts"]))
    if protos.shape != (num_classes, feature_dim) or proto_counts.shape != (num_classes,):
        raise ValueError(f"expected {num_classes}x{feature_dim} prototypes and {num_classes} counts, "
                         f"got {protos.shape} and {proto_counts.shape}")
    prototypes, has_proto = torch.from_numpy(protos), torch.from_numpy(proto_counts > 0)
    return (prototypes, has_proto) if device is None else (prototypes.to(device), has_proto.to(device))


def fedproto_task(call: DeviceCall) -> Message:
    """``train.fedproto``: train the device's own model with CE + lam * MSE(feature, global
    prototype of its class); upload its local prototypes and class counts."""
    ctx, device = call.ctx, call.device
    config = call.config()
    training = call.scenario.training
    tier, modalities = device.model_tier, device.modalities
    key = model_key(tier, modalities)
    num_classes = ctx.dataset.num_classes
    model = device_model(ctx, call.device_id, tier, modalities, call.state)
    where = model_device(model)  # cpu or cuda (backend.torch_device); the draws stay on the cpu
    prototypes, has_proto = global_prototypes(config, num_classes, model.feature_dim, where)
    lam = float(config["lam"])
    epochs = int(config.get("local-epochs", training.local_epochs))
    inputs = to_tensors(device.data, modalities, where)
    labels = torch.from_numpy(device.data.labels.astype(np.int64)).to(where)
    optimizer = (torch.optim.Adam if training.optimizer == "adam" else torch.optim.SGD)(
        model.parameters(), lr=training.learning_rate)
    generator = torch.Generator().manual_seed(call.seed("fedproto", call.server_round, call.device_id))
    total, total_proto, batches = 0.0, 0.0, 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(where)
        for start in range(0, len(labels), training.batch_size):
            idx = order[start:start + training.batch_size]
            features = model.features({m: x[idx] for m, x in inputs.items()})
            loss, distance = proto_loss(model.head(features), features, labels[idx], prototypes, has_proto, lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, total_proto = total + float(loss.detach()), total_proto + float(distance.detach())
            batches += 1
    means, counts = local_prototypes(model, device.data, modalities, num_classes)
    # Training, then one forward pass over the shard for the prototypes (the head's share of
    # it is counted too: a few hundred FLOPs per sample, not worth a separate count).
    flops = (ctx.train_flops_per_sample(tier, modalities) * len(labels) * epochs
             + ctx.forward_flops_per_sample(tier, modalities) * len(labels))
    return call.reply({
        "fedproto": ConfigRecord({"prototypes": get_codec(str(config["codec"])).encode(means),
                                  "counts": get_codec(COUNTS_CODEC).encode(counts.astype(np.float32))}),
        "metrics": MetricRecord({"num-examples": len(labels), "train-loss": total / max(batches, 1),
                                 "proto-loss": total_proto / max(batches, 1)}),
    }, flops, state=pack(call.state, key, model.state_dict()))


# -- the server's half: pure functions, worked by hand in tests/test_fedproto.py -------
def aggregate_prototypes(means: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global prototypes (C x d: per class, the count-weighted mean of the local prototypes
    (devices, C, d) of the devices holding it; a zero row where none does) and the counts."""
    counts = np.asarray(counts, dtype=np.float64)
    sums = np.einsum("dl,dlf->lf", counts, np.asarray(means, dtype=np.float64))
    totals = counts.sum(axis=0)
    return np.divide(sums, totals[:, None], out=np.zeros_like(sums), where=totals[:, None] > 0), totals


def nearest_prototype(features: np.ndarray, prototypes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The class of the nearest (Euclidean) prototype for each feature row, among classes with one."""
    classes = np.flatnonzero(np.asarray(counts) > 0)
    distances = ((features[:, None, :] - prototypes[None, classes, :]) ** 2).sum(-1)
    return classes[distances.argmin(axis=1)]


class FedProto(FedkdStrategy, NoClientEvaluation, Strategy):
    """FedProto: devices with their own models exchange class prototypes, no public data (Tan et al. 2022)."""

    shares_weights = False
    device_tasks = {MESSAGE_TYPE: fedproto_task}

    def __init__(self, fraction_train: float = 0.1, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 lam: float = 1.0, codec: str = "fp32", downlink_codec: str | None = None,
                 local_epochs: int | None = None, proto_accuracy: bool = True):
        """``lam``: weight of the prototype distance (the authors' code's default, 1); ``codec`` /
        ``downlink_codec``: how prototypes travel up / down; ``proto_accuracy``: also score the
        paper's nearest-prototype inference (column ``accuracy_proto``)."""
        check_sampling(fraction_train, min_train_nodes, min_available_nodes)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if local_epochs is not None and local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1 or null, got {local_epochs}")
        get_codec(codec), get_codec(downlink_codec or codec)  # fail now on a bad codec name
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.min_available_nodes, self.lam = min_available_nodes, float(lam)
        self.codec, self.downlink_codec = codec, downlink_codec or codec
        self.local_epochs, self.proto_accuracy = local_epochs, bool(proto_accuracy)
        # Per feature dimension: the global prototypes (C x d) and the counts behind each row.
        self.prototypes: dict[int, np.ndarray] = {}
        self.counts: dict[int, np.ndarray] = {}
        self._dims: dict[str, int] = {}  # model tier -> feature dimension
        self.num_classes: int | None = None
        self._panel = None

    # -- fedkd hooks ------------------------------------------------------------
    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before round 1: how many classes the run has."""
        super().fedkd_setup(env)
        self.num_classes = env.public.num_classes

    def fedkd_state(self) -> dict:
        """The global prototypes and their counts per feature dimension, for checkpoints."""
        return {"prototypes": dict(self.prototypes), "counts": dict(self.counts)}

    def fedkd_restore(self, state: dict) -> None:
        self.prototypes = {int(d): np.asarray(p) for d, p in state["prototypes"].items()}
        self.counts = {int(d): np.asarray(c) for d, c in state["counts"].items()}

    def fedkd_round_metrics(self, ctx, device_state: Mapping[int, Any]) -> dict[str, float]:
        """``accuracy_proto``: the panel's mean test accuracy with the paper's inference (the
        nearest global prototype of the device's group, in its own model's feature space)."""
        if not self.proto_accuracy or not self.prototypes:
            return {}
        if self._panel is None:  # the scoring protocol's panel, a pure function of the scenario
            self._panel = evaluation_panel(ctx, ctx.scenario.evaluation.panel_devices)
        test, scores = ctx.test_split, []
        for device in self._panel:
            model = own_model(ctx, device, device_state).build()
            protos, counts = self.prototypes.get(model.feature_dim), self.counts.get(model.feature_dim)
            if protos is None:
                continue  # no device of its group has reported yet
            features = _features(model, test, device.modalities)
            scores.append(float((nearest_prototype(features, protos, counts) == test.labels).mean()))
        return {"accuracy_proto": float(np.mean(scores))} if scores else {}

    # -- Flower's Strategy API --------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> FedProto: fraction %.2f, lambda %.2f, codec %s/%s", self.fraction_train, self.lam,
            self.codec, self.downlink_codec)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = sample_devices(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        node_ids = sorted(node_ids)
        task = {"server-round": server_round, "lam": self.lam, "codec": self.codec}
        if self.local_epochs is not None:
            task["local-epochs"] = int(self.local_epochs)
        dims = self._feature_dims(grid, node_ids) if self.prototypes else {}
        return [Message(RecordDict({"config": ConfigRecord({**task, **self._prototypes_for(dims.get(node))})}),
                        node, MESSAGE_TYPE) for node in node_ids]

    def _feature_dims(self, grid: Grid, node_ids: list[int]) -> dict[int, int]:
        """Each device's feature dimension, from its registered model tier."""
        if not hasattr(grid, "node_profiles"):
            raise RuntimeError("FedProto needs each device's model tier: run it on fedkd's simulated grid "
                               "(grid.node_profiles)")
        dims = {}
        for node, profile in grid.node_profiles(node_ids).items():
            if profile.model_tier not in self._dims:
                self._dims[profile.model_tier] = self.env.ctx.new_model(profile.model_tier).feature_dim
            dims[node] = self._dims[profile.model_tier]
        return dims

    def _prototypes_for(self, dim: int | None) -> dict:
        if dim not in self.prototypes:
            return {}
        return {"prototypes": get_codec(self.downlink_codec).encode(self.prototypes[dim].astype(np.float32)),
                "prototype-counts": get_codec(COUNTS_CODEC).encode(self.counts[dim].astype(np.float32))}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        self.merge([(decode_any(bytes(r.content["fedproto"]["prototypes"])).astype(np.float64),
                     decode_any(bytes(r.content["fedproto"]["counts"])).astype(np.float64)) for r in valid])
        return None, weighted_reply_metrics(valid, "train-loss")

    def merge(self, uploads: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Take a round's local prototypes and counts into the global ones, group by group (feature
        dimension): the classes they cover get this round's weighted mean, the others keep theirs."""
        groups: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for means, counts in uploads:
            if means.ndim != 2 or means.shape[0] != self.num_classes or counts.shape != (self.num_classes,):
                raise ValueError(f"expected {self.num_classes} x d prototypes and {self.num_classes} counts, "
                                 f"got {means.shape} and {counts.shape}")
            groups.setdefault(means.shape[1], []).append((means, counts))
        for dim, members in sorted(groups.items()):
            protos, totals = aggregate_prototypes(np.stack([m for m, _ in members]), np.stack([c for _, c in members]))
            old_protos = self.prototypes.get(dim, np.zeros_like(protos)).copy()
            old_counts = self.counts.get(dim, np.zeros_like(totals)).copy()
            covered = totals > 0
            old_protos[covered], old_counts[covered] = protos[covered], totals[covered]
            self.prototypes[dim], self.counts[dim] = old_protos, old_counts


@torch.no_grad()
def _features(model, data, modalities, batch_size: int = 1024) -> np.ndarray:
    """The model's features (its head's input) for every sample of ``data``."""
    model.eval()
    inputs = to_tensors(data, modalities, model_device(model))
    out = [model.features({m: x[s:s + batch_size] for m, x in inputs.items()})
           for s in range(0, len(data), batch_size)]
    return torch.cat(out).cpu().numpy()
