"""The device half of weight-sharing strategies: Flower's ``train`` and ``evaluate``
tasks, which every Flower strategy (FedAvg, FedProx, a user's subclass) sends.

fedkd runs them for any strategy without a device half of its own; FedDF and
the centralized bound reuse ``train_weights`` for their per-architecture task
(``train.architecture``).
"""
from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord

from .contract import DeviceCall
from .protocol import torch_state_dict
from .training import accuracy, train_local


def train_weights(call: DeviceCall) -> Message:
    """Load the weights the server sent, train them on the device's shard, send them back."""
    ctx, device, scenario = call.ctx, call.device, call.scenario
    key, arrays = call.arrays()
    config = call.config()
    weights = torch_state_dict(arrays)
    # The model has the encoders the server sent: all of them for FedAvg's shared
    # model, only the device's own for a per-architecture model (FedDF). Weights of
    # another architecture fail to load, loudly.
    sent = tuple(m for m in ctx.dataset.modality_names if any(k.startswith(f"encoders.{m}.") for k in weights))
    model = ctx.new_model(device.model_tier, modalities=sent)
    model.load_state_dict(weights)
    training = scenario.training
    epochs = int(config.get("local-epochs", training.local_epochs))
    outcome = train_local(
        model, device.data, device.modalities, epochs=epochs, batch_size=training.batch_size,
        learning_rate=float(config.get("learning-rate", training.learning_rate)),
        seed=call.seed("train", call.server_round, call.device_id),
        proximal_mu=float(config.get("proximal-mu", 0.0)), optimizer=training.optimizer,
        self_distillation=training.self_distillation,
    )
    flops = (ctx.train_flops_per_sample(device.model_tier, device.modalities) * outcome.num_examples * epochs
             + outcome.extra_flops)
    return call.reply({
        key: ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": outcome.num_examples, "train-loss": outcome.mean_loss}),
    }, flops)


def evaluate_weights(call: DeviceCall) -> Message:
    """Score the weights the server sent on the device's shard."""
    ctx, device = call.ctx, call.device
    _, arrays = call.arrays()
    model = ctx.new_model(device.model_tier)
    model.load_state_dict(torch_state_dict(arrays))
    acc = accuracy(model, device.data, device.modalities)
    flops = ctx.forward_flops_per_sample(device.model_tier, device.modalities) * len(device.data)
    return call.reply({"metrics": MetricRecord({"num-examples": len(device.data), "accuracy": acc})}, flops)
