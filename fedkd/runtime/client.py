"""The ClientApp: executes one device's task, whichever device the message names.

Executor nodes are not devices: the simulated grid puts the device id in each
message (``fedkd.task``), and the client loads that device's shard, sensors
and model size from the scenario. It reports the FLOPs it spent
(``fedkd.cost``) so the simulated world can time the work.
"""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..runtime.records import COST, PREFIX, cost_record, task_of
from ..scenario import Scenario
from ..seeding import derive_seed
from ..training import accuracy, train_local
from .context import simulation_context


def _strategy_records(message: Message) -> tuple[str, ArrayRecord, ConfigRecord]:
    """The strategy's ArrayRecord (under whatever key it chose) and its config."""
    arrays = [(k, v) for k, v in message.content.array_records.items() if not k.startswith(PREFIX)]
    if len(arrays) != 1:
        raise ValueError(f"expected one ArrayRecord from the strategy, got {[k for k, _ in arrays]}")
    configs = [v for k, v in message.content.config_records.items() if not k.startswith(PREFIX)]
    return arrays[0][0], arrays[0][1], configs[0] if configs else ConfigRecord()


def handle_train(scenario: Scenario, message: Message) -> Message:
    task = task_of(message)
    device_id, server_round = int(task["device_id"]), int(task["round"])
    ctx = simulation_context(scenario)
    device = ctx.device(device_id)
    key, arrays, config = _strategy_records(message)
    model = ctx.new_model(device.model_tier)
    model.load_state_dict(arrays.to_torch_state_dict())
    training = scenario.training
    epochs = int(config.get("local-epochs", training.local_epochs))
    outcome = train_local(
        model, device.data, device.modalities, epochs=epochs, batch_size=training.batch_size,
        learning_rate=float(config.get("learning-rate", training.learning_rate)),
        seed=derive_seed(scenario.seed, "train", server_round, device_id),
        proximal_mu=float(config.get("proximal-mu", 0.0)), optimizer=training.optimizer,
    )
    flops = ctx.train_flops_per_sample(device.model_tier, device.modalities) * outcome.num_examples * epochs
    return Message(RecordDict({
        key: ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"num-examples": outcome.num_examples, "train-loss": outcome.mean_loss}),
        COST: cost_record(flops),
    }), reply_to=message)


def handle_evaluate(scenario: Scenario, message: Message) -> Message:
    task = task_of(message)
    ctx = simulation_context(scenario)
    device = ctx.device(int(task["device_id"]))
    _, arrays, _ = _strategy_records(message)
    model = ctx.new_model(device.model_tier)
    model.load_state_dict(arrays.to_torch_state_dict())
    acc = accuracy(model, device.data, device.modalities)
    flops = ctx.forward_flops_per_sample(device.model_tier, device.modalities) * len(device.data)
    return Message(RecordDict({
        "metrics": MetricRecord({"num-examples": len(device.data), "accuracy": acc}),
        COST: cost_record(flops),
    }), reply_to=message)


def make_client_app(scenario: Scenario) -> ClientApp:
    """A ClientApp bound to ``scenario``; the closure holds only the (small) scenario."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        # One thread per task: the same numbers on every backend, and executors
        # running side by side do not fight over cores.
        torch.set_num_threads(1)
        return handle_train(scenario, message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        return handle_evaluate(scenario, message)

    return app
