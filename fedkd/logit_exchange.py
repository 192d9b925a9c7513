"""The base of strategies that exchange predictions on a shared public set
instead of model weights.

Each round the server samples devices and sends them (a) the public samples
to predict and (b) its current targets for the samples of the previous round.
Each device digests the targets, trains on its private shard, and returns its
logits for the new public samples through a codec. The server combines them
into the next targets; a subclass says how by overriding ``combine``. Devices
keep their own models (any architecture, any sensors), so nothing forces one
architecture on the population.

With ``public_pretrain_epochs`` > 0 a device whose model is new (its first
task, or the first with a model size or sensor set it had not used) first
trains it for that many epochs on labelled public samples, FedMD's transfer
step: the first ``public_pretrain_samples`` (None: all) of the public split,
as the client takes them (``logits_task`` below).
``fedkd_labels_read`` reports those samples.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from .batched import batchable, distill_states, train_states
from .codecs import decode_any, get_codec
from .contract import BatchedTask, DeviceCall, FedkdStrategy, PublicSet, StrategyEnv
from .device_models import device_model, model_key, model_keys, pack, unpack
from .distill import distill_on
from .labels import labelled_public
from .protocol import FOG_MODEL, torch_state_dict
from .seeding import derive_seed, rng_for
from .training import TrainOutcome, predict_logits, train_local
from .strategy_parts import NoClientEvaluation, check_sampling, sample_devices, weighted_reply_metrics

MESSAGE_TYPE = "train.logits"


@dataclass(frozen=True)
class _LogitsJob:
    """What one device does in a round of a logit-exchange strategy (read from its message)."""

    tier: str
    modalities: tuple[str, ...]
    key: str  # the model's key in the device's state
    learning_rate: float
    local_epochs: int
    fog_model: ArrayRecord | None  # the device starts from its fog's model
    pretrain_epochs: int  # 0: no transfer step this round (the model is not new, or none asked)
    pretrain_samples: int | None  # None: the whole public split
    target_indices: np.ndarray | None  # the server's targets to digest, and the samples they refer to
    targets_payload: bytes | None  # encoded (a codec's bytes)
    distill_epochs: int
    temperature: float
    public_indices: np.ndarray
    codec: str

    # Decoded when used, not when read: batch keys need neither.
    @cached_property
    def fog_weights(self) -> dict[str, torch.Tensor] | None:
        if self.fog_model is None:
            return None
        return {name: t.float() for name, t in torch_state_dict(self.fog_model).items()}

    @cached_property
    def targets(self) -> np.ndarray | None:
        return None if self.targets_payload is None else decode_any(self.targets_payload)


def _logits_job(call: DeviceCall) -> _LogitsJob:
    device, config, training = call.device, call.config(), call.scenario.training
    # A plan may ask for one of the device's sensors only, or another model size.
    tier = str(config.get("model-tier", device.model_tier))
    modalities = tuple(str(config["modality"]).split("+")) if "modality" in config else device.modalities
    if not set(modalities) <= set(device.modalities):
        raise ValueError(f"device {call.device_id} senses {device.modalities}, not {modalities}")
    key = model_key(tier, modalities)
    fog_model = call.message.content.get(FOG_MODEL)
    # FedMD's transfer step, for a model the device has not trained before.
    new = fog_model is None and key not in model_keys(call.state)
    has_targets = "targets" in config
    return _LogitsJob(
        tier, modalities, key, float(config.get("learning-rate", training.learning_rate)),
        int(config.get("local-epochs", training.local_epochs)), fog_model,
        int(config.get("public-pretrain-epochs", 0)) if new else 0,
        int(config["public-pretrain-samples"]) if "public-pretrain-samples" in config else None,
        np.asarray(config["target-indices"], dtype=np.int64) if has_targets else None,
        bytes(config["targets"]) if has_targets else None,
        int(config.get("distill-epochs", 1)), float(config.get("temperature", 1.0)),
        np.asarray(config["public-indices"], dtype=np.int64), str(config.get("codec", "fp32")))


def _labelled(call: DeviceCall, job: _LogitsJob):
    """The labelled public samples of the transfer step: the run's first ``public-pretrain-samples``
    (all of the split when not given), the same ones other strategies with that budget read."""
    public = call.ctx.dataset.split("public")
    count = len(public) if job.pretrain_samples is None else job.pretrain_samples
    return public.subset(labelled_public(call.scenario.seed, len(public), count))


def _logits_reply(call: DeviceCall, job: _LogitsJob, weights: dict[str, torch.Tensor], logits: np.ndarray,
                  outcome: TrainOutcome, distill_loss: float) -> Message:
    """The device's reply: its logits through the codec, its metrics, its FLOPs, and its model
    as its state (unless it starts from its fog's model next time too)."""
    per_sample = call.ctx.train_flops_per_sample(job.tier, job.modalities)
    flops = 0.0  # summed in the order the steps run: the same float in every process
    if job.pretrain_epochs > 0:
        flops += per_sample * len(_labelled(call, job)) * job.pretrain_epochs
    if job.targets is not None:
        flops += per_sample * len(job.target_indices) * job.distill_epochs
    flops += per_sample * outcome.num_examples * job.local_epochs + outcome.extra_flops
    flops += call.ctx.forward_flops_per_sample(job.tier, job.modalities) * len(job.public_indices)
    payload = get_codec(job.codec).encode(logits)
    return call.reply({
        "logits": ConfigRecord({"payload": payload}),
        "metrics": MetricRecord({"num-examples": outcome.num_examples, "train-loss": outcome.mean_loss,
                                 "distill-loss": distill_loss}),
    }, flops, state=pack(call.state, job.key, weights) if job.fog_model is None else None)


def logits_task(call: DeviceCall) -> Message:
    """One round of a logit-exchange strategy on one device (FedMD's loop, pipelined).

    1. digest: distill the device's own model towards the server's targets on
       the public samples they refer to (``target-indices``, ``targets``);
    2. revisit: train on the device's private shard;
    3. communicate: predict the public samples in ``public-indices`` with the
       device's own sensors and send the logits through the chosen codec.
    The device's model is its own (any architecture) and travels as its state.
    """
    ctx, device, scenario = call.ctx, call.device, call.scenario
    device_id, server_round = call.device_id, call.server_round
    job = _logits_job(call)
    training = scenario.training
    public = ctx.dataset.split("public")
    distill_loss = 0.0
    # A device that starts from its fog's model need not keep its own between rounds.
    model = device_model(ctx, device_id, job.tier, job.modalities, call.state if job.fog_model is None else None)
    if job.fog_model is not None:
        model.load_state_dict(job.fog_weights)
    elif job.pretrain_epochs > 0:
        # FedMD's transfer-learning step: a new device first learns the labelled public set
        # (or the run's first public-pretrain-samples labelled samples, to bound the cost).
        train_local(model, _labelled(call, job), job.modalities, epochs=job.pretrain_epochs,
                    batch_size=training.batch_size, learning_rate=job.learning_rate,
                    seed=derive_seed(scenario.seed, "pretrain", device_id), optimizer=training.optimizer)
    if job.targets is not None:
        distill_loss = distill_on(model, public.subset(job.target_indices), job.modalities, job.targets,
                                  epochs=job.distill_epochs, batch_size=training.batch_size,
                                  learning_rate=job.learning_rate, temperature=job.temperature,
                                  seed=derive_seed(scenario.seed, "digest", server_round, device_id))
    outcome = train_local(model, device.data, job.modalities, epochs=job.local_epochs,
                          batch_size=training.batch_size, learning_rate=job.learning_rate,
                          seed=derive_seed(scenario.seed, "train", server_round, device_id),
                          optimizer=training.optimizer, self_distillation=training.self_distillation)
    logits = predict_logits(model, public.subset(job.public_indices), job.modalities).numpy()
    return _logits_reply(call, job, model.state_dict(), logits, outcome, distill_loss)


def logits_batch_key(call: DeviceCall):
    """Calls with equal keys run as one batch: one architecture, one configuration, the same
    targets to digest; None when the training settings cannot batch."""
    training = call.scenario.training
    if not batchable(training.optimizer, training.self_distillation):
        return None
    job = _logits_job(call)
    digest = None if job.targets_payload is None else hashlib.blake2b(
        job.target_indices.tobytes() + job.targets_payload, digest_size=16).hexdigest()
    return (job.tier, job.modalities, call.device.modalities == job.modalities, job.fog_model is not None,
            job.pretrain_epochs, job.pretrain_samples, job.learning_rate, job.local_epochs, digest,
            job.distill_epochs, job.temperature)


def logits_task_batched(calls: list[DeviceCall]) -> list[Message]:
    """:func:`logits_task` for calls of one key, each step trained together (fedkd.batched).
    One model gives the architecture; a device's weights come from its state, its fog's
    model, or (a new model) its seeded initial model."""
    ctx, scenario, first = calls[0].ctx, calls[0].scenario, calls[0]
    training = scenario.training
    jobs = [_logits_job(call) for call in calls]
    job = jobs[0]
    public = ctx.dataset.split("public")
    base = ctx.new_model(job.tier, modalities=job.modalities)
    if not batchable(training.optimizer, training.self_distillation, base):
        raise ValueError("this model cannot train batched (buffers or dropout)")  # -> one by one
    states = [j.fog_weights if j.fog_model is not None else _own_weights(call, j) for call, j in zip(calls, jobs)]
    names = list(base.state_dict())
    if any(sorted(state) != sorted(names) for state in states):
        raise ValueError("a starting model is not the architecture's")  # one by one names what is wrong
    common = dict(batch_size=training.batch_size, learning_rate=job.learning_rate)
    if job.pretrain_epochs > 0:
        labelled = _labelled(first, job)
        states, _ = train_states(base, states, [labelled] * len(calls), job.modalities, epochs=job.pretrain_epochs,
                                 seeds=[derive_seed(scenario.seed, "pretrain", c.device_id) for c in calls],
                                 optimizer=training.optimizer, **common)
    distill_losses = [0.0] * len(calls)
    if job.targets is not None:
        states, distill_losses = distill_states(
            base, states, public.subset(job.target_indices), job.modalities, job.targets,
            epochs=job.distill_epochs, temperature=job.temperature,
            seeds=[derive_seed(scenario.seed, "digest", c.server_round, c.device_id) for c in calls], **common)
    states, outcomes = train_states(
        base, states, [c.device.data for c in calls], job.modalities, epochs=job.local_epochs,
        seeds=[derive_seed(scenario.seed, "train", c.server_round, c.device_id) for c in calls],
        optimizer=training.optimizer, **common)
    replies = []
    for call, j, weights, outcome, distill_loss in zip(calls, jobs, states, outcomes, distill_losses):
        base.load_state_dict(weights)
        logits = predict_logits(base, public.subset(j.public_indices), j.modalities).numpy()
        replies.append(_logits_reply(call, j, {n: weights[n] for n in names}, logits, outcome, distill_loss))
    return replies


def _own_weights(call: DeviceCall, job: _LogitsJob) -> dict[str, torch.Tensor]:
    """The device's own model's weights: kept in its state, else its seeded initial ones."""
    weights = unpack(call.state, job.key)
    if weights is None:
        weights = device_model(call.ctx, call.device_id, job.tier, job.modalities).state_dict()
    return dict(weights)


LOGITS_BATCHED = BatchedTask(logits_batch_key, logits_task_batched)


class LogitExchange(FedkdStrategy, NoClientEvaluation, Strategy):
    """Exchange logits on public samples; subclasses choose how to combine them."""

    shares_weights = False
    device_tasks = {MESSAGE_TYPE: logits_task}
    batched_tasks = {MESSAGE_TYPE: LOGITS_BATCHED}

    def __init__(self, fraction_train: float = 0.1, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 public_batch: int = 256, codec: str = "fp32", downlink_codec: str | None = None,
                 temperature: float = 1.0, distill_epochs: int = 1, local_epochs: int | None = None,
                 public_pretrain_epochs: int = 0, public_pretrain_samples: int | None = None):
        check_sampling(fraction_train, min_train_nodes, min_available_nodes)
        if public_pretrain_epochs < 0:
            raise ValueError(f"public_pretrain_epochs must be 0 or more, got {public_pretrain_epochs}")
        if public_pretrain_samples is not None and public_pretrain_samples < 1:
            raise ValueError(f"public_pretrain_samples must be positive or None, got {public_pretrain_samples}")
        if public_batch < 1:
            raise ValueError(f"public_batch must be positive, got {public_batch}")
        get_codec(codec), get_codec(downlink_codec or codec)  # fail now on a bad codec name
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.min_available_nodes, self.public_batch = min_available_nodes, public_batch
        self.codec, self.downlink_codec = codec, downlink_codec or codec
        self.temperature, self.distill_epochs, self.local_epochs = temperature, distill_epochs, local_epochs
        self.public_pretrain_epochs = public_pretrain_epochs
        self.public_pretrain_samples = public_pretrain_samples  # None: the whole public set
        self.public: PublicSet | None = None
        self.targets: np.ndarray | None = None  # probabilities, (public_batch, classes)
        self.target_indices: np.ndarray | None = None
        self._asked_indices: np.ndarray | None = None
        # The public samples devices may be asked about (None: all); a subclass may hold some out.
        self.public_pool: np.ndarray | None = None

    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before the first round: the public set this run shares."""
        super().fedkd_setup(env)
        self.public = env.public

    def fedkd_labels_read(self) -> dict[str, np.ndarray]:
        """{purpose: the public samples whose labels this strategy reads}: the samples devices
        pretrain on (``"transfer"``) when pretraining is on, else nothing; the server reads none."""
        if self.public_pretrain_epochs <= 0:
            return {}
        if self.public is None:
            raise RuntimeError(f"{type(self).__name__} needs fedkd_setup() with the public set first")
        return {"transfer": labelled_public(self.public.seed, self.public.size, self._pretrain_count())}

    def _pretrain_count(self) -> int:
        """How many public samples a device pretrains on: the client's rule, the first
        ``public_pretrain_samples`` of the run's labelled order (all of the split for None)."""
        wanted = self.public.size if self.public_pretrain_samples is None else self.public_pretrain_samples
        return min(int(wanted), self.public.size)

    def fedkd_state(self) -> dict:
        """What later rounds depend on, for checkpoints: the targets and the samples they refer to."""
        return {"targets": self.targets, "target_indices": self.target_indices,
                "asked_indices": self._asked_indices}

    def fedkd_restore(self, state: dict) -> None:
        """The inverse of :meth:`fedkd_state`, on a strategy built and bound as the run's was."""
        self.targets, self.target_indices = state["targets"], state["target_indices"]
        self._asked_indices = state["asked_indices"]

    # -- what subclasses change ---------------------------------------------------
    def combine(self, logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Targets (probabilities) from device logits (devices, samples, classes)."""
        raise NotImplementedError

    # -- Flower's Strategy API ----------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> %s: fraction %.2f, public batch %d, codec %s/%s, T=%.2f", type(self).__name__,
            self.fraction_train, self.public_batch, self.codec, self.downlink_codec, self.temperature)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = self._sample(grid)
        self._ask_public_batch(server_round)
        targets = None if self.targets is None else (self.target_indices, self.targets)
        content = RecordDict({"config": self._task(server_round, self.codec, self.local_epochs, targets)})
        return [Message(content, node, MESSAGE_TYPE) for node in node_ids]

    # -- pieces subclasses that plan per device reuse ----------------------------
    def _sample(self, grid: Grid) -> list[int]:
        """This round's devices, as FedAvg samples them, in id order."""
        if self.public is None:
            raise RuntimeError(f"{type(self).__name__} needs fedkd_setup() with the public set before round 1")
        node_ids = sample_devices(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        return sorted(node_ids)

    def _ask_public_batch(self, server_round: int) -> None:
        """Draw the round's public samples from (seed, round): the same in every process and on resume."""
        rng = rng_for(self.public.seed, "public-batch", server_round)
        pool = np.arange(self.public.size) if self.public_pool is None else self.public_pool
        self._asked_indices = np.sort(rng.choice(pool, min(self.public_batch, len(pool)), replace=False))

    def _task(self, server_round: int, codec: str, local_epochs: int | None,
              targets: tuple[np.ndarray, np.ndarray] | None) -> ConfigRecord:
        """The config a device's ``train.logits`` task reads (``logits_task``)."""
        task = ConfigRecord({"server-round": server_round, "public-indices": self._asked_indices.tolist(),
                             "codec": codec, "temperature": float(self.temperature),
                             "distill-epochs": int(self.distill_epochs),
                             "public-pretrain-epochs": int(self.public_pretrain_epochs)})
        if self.public_pretrain_samples is not None:
            task["public-pretrain-samples"] = int(self.public_pretrain_samples)
        if local_epochs is not None:
            task["local-epochs"] = int(local_epochs)
        if targets is not None:
            indices, probs = targets
            task["targets"] = get_codec(self.downlink_codec).encode(probs.astype(np.float32))
            task["target-indices"] = indices.tolist()
        return task

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        logits = np.stack([decode_any(bytes(r.content["logits"]["payload"])) for r in valid])
        weights = np.array([float(r.content["metrics"]["num-examples"]) for r in valid])
        self.targets = self.combine(logits, weights)
        self.target_indices = self._asked_indices
        return None, weighted_reply_metrics(valid, "train-loss")
