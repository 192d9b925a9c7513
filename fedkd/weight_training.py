"""The device half of weight-sharing strategies: Flower's ``train`` and ``evaluate``
tasks, which every Flower strategy (FedAvg, FedProx, a user's subclass) sends.

fedkd runs them for any strategy without a device half of its own; FedDF and
the centralized bound reuse ``train_weights`` for their per-architecture task
(``train.architecture``). ``WEIGHTS_BATCHED`` is ``train_weights`` for several
devices at once (``backend.batch_devices``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from torch import nn

from .batched import batchable, train_states
from .contract import BatchedTask, DeviceCall
from .protocol import torch_state_dict
from .training import TrainOutcome, accuracy, train_local


@dataclass(frozen=True)
class _WeightsJob:
    """What ``train_weights`` does for one call: the weights the server sent, and how to train them."""

    key: str
    weights: dict[str, torch.Tensor]
    sent_modalities: tuple[str, ...]  # whose encoders the weights hold
    epochs: int
    learning_rate: float
    proximal_mu: float
    seed: int

    def model(self, call: DeviceCall) -> nn.Module:
        """A model of the sent architecture (its own initial weights: load the job's next)."""
        return call.ctx.new_model(call.device.model_tier, modalities=self.sent_modalities)


def _job(call: DeviceCall) -> _WeightsJob:
    key, arrays = call.arrays()
    config = call.config()
    weights = torch_state_dict(arrays)
    # The model has the encoders the server sent: all of them for FedAvg's shared
    # model, only the device's own for a per-architecture model (FedDF).
    sent = tuple(m for m in call.ctx.dataset.modality_names if any(k.startswith(f"encoders.{m}.") for k in weights))
    training = call.scenario.training
    return _WeightsJob(key, weights, sent, int(config.get("local-epochs", training.local_epochs)),
                       float(config.get("learning-rate", training.learning_rate)),
                       float(config.get("proximal-mu", 0.0)), call.seed("train", call.server_round, call.device_id))


def _reply(call: DeviceCall, job: _WeightsJob, trained: Mapping[str, torch.Tensor],
           outcome: TrainOutcome) -> Message:
    device = call.device
    flops = (call.ctx.train_flops_per_sample(device.model_tier, device.modalities) * outcome.num_examples
             * job.epochs + outcome.extra_flops)
    return call.reply({
        job.key: ArrayRecord(dict(trained)),
        "metrics": MetricRecord({"num-examples": outcome.num_examples, "train-loss": outcome.mean_loss}),
    }, flops)


def train_weights(call: DeviceCall) -> Message:
    """Load the weights the server sent, train them on the device's shard, send them back."""
    job = _job(call)
    model = job.model(call)
    model.load_state_dict(job.weights)  # weights of another architecture fail to load, loudly
    training = call.scenario.training
    outcome = train_local(
        model, call.device.data, call.device.modalities, epochs=job.epochs, batch_size=training.batch_size,
        learning_rate=job.learning_rate, seed=job.seed, proximal_mu=job.proximal_mu,
        optimizer=training.optimizer, self_distillation=training.self_distillation,
    )
    return _reply(call, job, model.state_dict(), outcome)


def weights_batch_key(call: DeviceCall):
    """Calls with equal keys train as one batch: one architecture (model size, the sensors
    sent and used) and one configuration; None when ``train_local``'s settings cannot batch."""
    training = call.scenario.training
    if not batchable(training.optimizer, training.self_distillation):
        return None
    _, arrays = call.arrays()
    config = call.config()
    return (call.device.model_tier, call.device.modalities, tuple(arrays.keys()),
            config.get("local-epochs", training.local_epochs), config.get("learning-rate", training.learning_rate),
            config.get("proximal-mu", 0.0))


def train_weights_batched(calls: list[DeviceCall]) -> list[Message]:
    """``train_weights`` for calls of one key, trained together (fedkd.batched): one model
    gives the architecture, the sent weights are stacked without building a model each."""
    jobs = [_job(call) for call in calls]
    training, first = calls[0].scenario.training, jobs[0]
    base = first.model(calls[0])
    names = list(base.state_dict())
    # Raised errors send the group one by one, where load_state_dict names what is wrong.
    if not batchable(training.optimizer, training.self_distillation, base):
        raise ValueError("this model cannot train batched (buffers or dropout)")
    if any(list(job.weights) != names for job in jobs):
        raise ValueError("the weights sent are not the architecture's")
    trained, outcomes = train_states(
        base, [job.weights for job in jobs], [call.device.data for call in calls], calls[0].device.modalities,
        epochs=first.epochs, batch_size=training.batch_size, learning_rate=first.learning_rate,
        seeds=[job.seed for job in jobs], proximal_mu=first.proximal_mu, optimizer=training.optimizer)
    return [_reply(call, job, weights, outcome)
            for call, job, weights, outcome in zip(calls, jobs, trained, outcomes)]


WEIGHTS_BATCHED = BatchedTask(weights_batch_key, train_weights_batched)


def evaluate_weights(call: DeviceCall) -> Message:
    """Score the weights the server sent on the device's shard."""
    ctx, device = call.ctx, call.device
    _, arrays = call.arrays()
    model = ctx.new_model(device.model_tier)
    model.load_state_dict(torch_state_dict(arrays))
    acc = accuracy(model, device.data, device.modalities)
    flops = ctx.forward_flops_per_sample(device.model_tier, device.modalities) * len(device.data)
    return call.reply({"metrics": MetricRecord({"num-examples": len(device.data), "accuracy": acc})}, flops)
