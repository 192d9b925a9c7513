"""Teacher KD: a big pretrained teacher labels devices' unlabeled data; students learn from its KD loss alone (Molo et al. 2024).

Molo, Carlini, Ciampi, Gennaro & Vadicamo, "Teacher-Student Models for AI
Vision at the Edge: A Car Parking Case Study", VISAPP 2024 (SciTePress); a
case study with no public arXiv id. The distillation loss is Hinton, Vinyals
& Dean, "Distilling the Knowledge in a Neural Network", 2015,
https://arxiv.org/abs/1503.02531.

In the case study a large detector pretrained on general-context data acts as
an oracle for shallow students on smart cameras, which learn new scenes from
its distillation loss alone, with no ground truth. fedkd's version classifies
(stall free / occupied) rather than detects:

- the teacher is a ``teacher_tier`` (``base``) model over ``teacher_modalities``
  (all by default), trained once on the server before round 1 on the public
  split *with* its labels, the stand-in for "general data". In fedkd's
  datasets the public split comes from the same world as the devices' data,
  so this teacher is kinder than a truly general one: no domain gap is
  modelled. It is trained on all its modalities together and on each alone,
  since most devices sense one;
- each round the sampled devices label their local shard (the round's stream)
  with the teacher and train their own student (their tier, their sensors,
  kept as device state) on the inputs only, with the KD loss at temperature T.
  Labels are never read. A device that senses none of the teacher's
  modalities cannot be taught and is not asked;
- ``teacher_at`` decides where the teacher runs. ``device``: the device
  downloads the teacher's weights (only the encoders it can feed, plus the
  head) every round, as a weak device would not keep a model four times its
  own, and pays the teacher's forward pass. ``edge``: two legs per round; the
  device uploads its raw samples (``query.teacher``), the edge server labels
  them and sends back only the soft labels (``train.teacher``, through
  ``codec``). The edge's own compute is not simulated, as no server compute is
  in fedkd. ``device`` spends downlink and FLOPs, ``edge`` spends uplink:
  which is cheaper depends on the device's link and chip, so both are offered.

Devices are scored with their own models on the test split (fedkd's device
panel), plus the teacher's accuracy (``accuracy_teacher`` and one column per
modality), which does not change.
"""
from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedkd.codecs import get_codec
from fedkd.contract import FedkdStrategy, StrategyEnv
from fedkd.models import TIERS
from fedkd.seeding import derive_seed
from fedkd.strategy_parts import NoClientEvaluation, check_sampling, sample_devices, weighted_reply_metrics
from fedkd.training import accuracy, train_local

from .device import query_task, soft_labels, teach_task

MESSAGE_TYPE = "train.teacher"
QUERY_TYPE = "query.teacher"
QUERY_TIMEOUT_S = 3600.0


def pretrain_teacher(ctx, tier: str, modalities: tuple[str, ...], epochs: int):
    """The teacher: ``epochs`` passes over the labelled public split, each with all of
    ``modalities`` together and then each alone (most devices sense one)."""
    training, seed = ctx.scenario.training, ctx.scenario.seed
    public = ctx.dataset.split("public")
    teacher = ctx.new_model(tier, seed=derive_seed(seed, "teacher-model"), modalities=modalities)
    views = [modalities] + ([(m,) for m in modalities] if len(modalities) > 1 else [])
    for epoch in range(epochs):
        for i, view in enumerate(views):
            train_local(teacher, public, view, epochs=1, batch_size=training.batch_size,
                        learning_rate=training.learning_rate, seed=derive_seed(seed, "teacher", epoch, i),
                        optimizer=training.optimizer)
    return teacher


class TeacherKD(FedkdStrategy, NoClientEvaluation, Strategy):
    shares_weights = False
    device_tasks = {MESSAGE_TYPE: teach_task, QUERY_TYPE: query_task}

    def __init__(self, fraction_train: float = 0.1, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 teacher_at: str = "device", teacher_tier: str = "base",
                 teacher_modalities: list[str] | None = None, teacher_epochs: int = 3,
                 temperature: float = 2.0, local_epochs: int | None = None, codec: str = "fp32"):
        """``teacher_at``: ``device`` (download the teacher) or ``edge`` (upload samples, download
        soft labels); ``teacher_modalities``: what the teacher reads (null = all); ``codec``: how
        the edge sends soft labels."""
        check_sampling(fraction_train, min_train_nodes, min_available_nodes)
        if teacher_at not in ("device", "edge"):
            raise ValueError(f"teacher_at must be 'device' or 'edge', got {teacher_at!r}")
        if teacher_tier not in TIERS:
            raise ValueError(f"teacher_tier must be one of {sorted(TIERS)}, got {teacher_tier!r}")
        if teacher_epochs < 0:
            raise ValueError(f"teacher_epochs must be >= 0, got {teacher_epochs}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        get_codec(codec)  # fail now on a bad codec name
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.min_available_nodes, self.teacher_at = min_available_nodes, teacher_at
        self.teacher_tier, self.teacher_epochs = teacher_tier, teacher_epochs
        self.requested_modalities = tuple(teacher_modalities) if teacher_modalities else None
        self.temperature, self.local_epochs, self.codec = temperature, local_epochs, codec
        self.teacher = None
        self.teacher_modalities: tuple[str, ...] = ()
        self._slices: dict[tuple[str, ...], ArrayRecord] = {}
        self._teacher_scores: dict[str, float] | None = None
        self._public_size = 0  # the labelled public split the teacher learns (set before round 1)

    # -- fedkd hooks ------------------------------------------------------------
    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before round 1: pretrain the teacher on the labelled public split."""
        super().fedkd_setup(env)
        ctx = env.ctx
        names = ctx.dataset.modality_names
        unknown = sorted(set(self.requested_modalities or ()) - set(names))
        if unknown:
            raise ValueError(f"teacher_modalities {unknown} are not modalities of the dataset {list(names)}")
        self.teacher_modalities = tuple(m for m in names if m in (self.requested_modalities or names))
        self.set_teacher(pretrain_teacher(ctx, self.teacher_tier, self.teacher_modalities, self.teacher_epochs),
                         self.teacher_modalities)
        self._public_size = len(ctx.dataset.split("public"))

    def fedkd_labels_read(self) -> dict[str, np.ndarray]:
        """The teacher learns the whole labelled public split."""
        return {"teacher": np.arange(self._public_size)}

    def set_teacher(self, teacher, modalities: tuple[str, ...]) -> None:
        """Use ``teacher`` (a MultimodalNet over ``modalities``) as it is."""
        self.teacher, self.teacher_modalities = teacher, tuple(modalities)
        self._slices, self._teacher_scores = {}, None

    def fedkd_round_metrics(self, ctx, device_state: dict) -> dict[str, float]:
        """The teacher's own scores beside the devices' (fedkd.scoring scores the students)."""
        if self._teacher_scores is None:  # the teacher never changes: score it once
            test, mods = ctx.test_split, self.teacher_modalities
            self._teacher_scores = {"accuracy_teacher": accuracy(self.teacher, test, mods)}
            if len(mods) > 1:
                self._teacher_scores |= {f"accuracy_teacher_{m}": accuracy(self.teacher, test, (m,))
                                         for m in mods}
        return dict(self._teacher_scores)

    # -- Flower's Strategy API --------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> TeacherKD: teacher %s over %s at the %s, T=%.2f, fraction %.2f",
            self.teacher_tier, "+".join(self.teacher_modalities) or "?", self.teacher_at,
            self.temperature, self.fraction_train)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.teacher is None:
            raise RuntimeError("TeacherKD needs its teacher (fedkd_setup) before round 1")
        node_ids = sample_devices(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        reads = self._teacher_reads(grid, node_ids)
        task = {"server-round": server_round, "temperature": float(self.temperature),
                "teacher-tier": self.teacher_tier}
        if self.local_epochs is not None:
            task["local-epochs"] = int(self.local_epochs)
        if self.teacher_at == "device":
            return [Message(RecordDict({"teacher": self._teacher_slice(mods),
                                        "config": ConfigRecord({**task, "teacher-modalities": list(mods)})}),
                            node, MESSAGE_TYPE) for node, mods in reads.items()]
        labels = self._label_at_edge(server_round, reads, grid)
        return [Message(RecordDict({"config": ConfigRecord({**task, "soft-labels": payload})}), node, MESSAGE_TYPE)
                for node, payload in labels.items()]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        return None, weighted_reply_metrics(valid, "kd-loss")

    # -- the teacher ------------------------------------------------------------
    def _teacher_reads(self, grid: Grid, node_ids: Iterable[int]) -> dict[int, tuple[str, ...]]:
        """Per sampled device, the teacher's modalities it senses (devices with none are left out)."""
        profiles = grid.node_profiles(sorted(node_ids))
        reads = {n: tuple(m for m in self.teacher_modalities if m in profiles[n].modalities)
                 for n in sorted(node_ids)}
        return {n: mods for n, mods in reads.items() if mods}

    def _teacher_slice(self, modalities: tuple[str, ...]) -> ArrayRecord:
        """The teacher's weights a device can use: the encoders of ``modalities`` and the head."""
        if modalities not in self._slices:
            keep = tuple(f"encoders.{m}." for m in modalities) + ("head.",)
            state = {k: v for k, v in self.teacher.state_dict().items() if k.startswith(keep)}
            self._slices[modalities] = ArrayRecord(state)
        return self._slices[modalities]

    def _label_at_edge(self, server_round: int, reads: dict[int, tuple[str, ...]], grid: Grid
                       ) -> dict[int, bytes]:
        """First leg at the edge: devices upload their samples; the teacher labels them here."""
        queries = [Message(RecordDict({"config": ConfigRecord({"server-round": server_round,
                                                               "teacher-modalities": list(mods)})}),
                           node, QUERY_TYPE) for node, mods in reads.items()]
        codec = get_codec(self.codec)
        labels = {}
        for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT_S):
            if reply.has_error():
                continue  # the device failed the upload: it is not asked to train
            inputs = {m: array.numpy() for m, array in reply.content["samples"].items()}
            labels[reply.metadata.src_node_id] = codec.encode(soft_labels(self.teacher, inputs, self.temperature))
        return labels
