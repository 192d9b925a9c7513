"""The ClientApp: executes one device's task, whichever device the message names.

Executor nodes are not devices: the simulated grid puts the device id in each
message (``fedkd.task``), and the client loads that device's shard, sensors
and model size from the scenario. It reports the FLOPs it spent
(``fedkd.cost``) so the simulated world can time the work.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..codecs import decode_any, get_codec
from ..device_models import model_key, pack, unpack
from ..distill import distill_on
from ..labels import labelled_public
from ..runtime.records import COST, FOG_MODEL, PREFIX, STATE, cost_record, task_of, torch_state_dict
from ..scenario import Scenario
from ..seeding import derive_seed
from ..training import accuracy, predict_logits, train_local
from .context import simulation_context
from .gossip_client import handle_gossip
from .teacher_client import handle_teacher, handle_teacher_query


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
        seed=derive_seed(scenario.seed, "train", server_round, device_id),
        proximal_mu=float(config.get("proximal-mu", 0.0)), optimizer=training.optimizer,
        self_distillation=training.self_distillation,
    )
    flops = (ctx.train_flops_per_sample(device.model_tier, device.modalities) * outcome.num_examples * epochs
             + outcome.extra_flops)
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
    model.load_state_dict(torch_state_dict(arrays))
    acc = accuracy(model, device.data, device.modalities)
    flops = ctx.forward_flops_per_sample(device.model_tier, device.modalities) * len(device.data)
    return Message(RecordDict({
        "metrics": MetricRecord({"num-examples": len(device.data), "accuracy": acc}),
        COST: cost_record(flops),
    }), reply_to=message)


def handle_logits(scenario: Scenario, message: Message) -> Message:
    """One round of a logit-exchange strategy on one device (FedMD's loop, pipelined).

    1. digest: distill the device's own model towards the server's targets on
       the public samples they refer to (``target-indices``, ``targets``);
    2. revisit: train on the device's private shard;
    3. communicate: predict the public samples in ``public-indices`` with the
       device's own sensors and send the logits through the chosen codec.
    The device's model is its own (any architecture) and travels as its state.
    """
    task = task_of(message)
    device_id, server_round = int(task["device_id"]), int(task["round"])
    ctx = simulation_context(scenario)
    device = ctx.device(device_id)
    config = _strategy_records_config(message)
    training = scenario.training
    # A plan may ask for one of the device's sensors only, or another model size.
    tier = str(config.get("model-tier", device.model_tier))
    modalities = tuple(str(config["modality"]).split("+")) if "modality" in config else device.modalities
    if not set(modalities) <= set(device.modalities):
        raise ValueError(f"device {device_id} senses {device.modalities}, not {modalities}")
    key = model_key(tier, modalities)
    model = ctx.new_model(tier, seed=derive_seed(scenario.seed, "device-model", device_id, key),
                          modalities=modalities)
    public = ctx.dataset.split("public")
    lr = float(config.get("learning-rate", training.learning_rate))
    per_sample = ctx.train_flops_per_sample(tier, modalities)
    flops, distill_loss = 0.0, 0.0
    state = message.content.get(STATE)
    fog_model = message.content.get(FOG_MODEL)
    # A device that starts from its fog's model need not keep its own between rounds.
    weights = ({name: t.float() for name, t in torch_state_dict(fog_model).items()}
               if fog_model is not None else unpack(state, key))
    if weights is not None:
        model.load_state_dict(weights)
    elif int(config.get("public-pretrain-epochs", 0)) > 0:
        # FedMD's transfer-learning step: a new device first learns the labelled public set
        # (or the run's first public-pretrain-samples labelled samples, to bound the cost:
        # the same ones other strategies with that label budget read, fedkd.labels).
        epochs = int(config["public-pretrain-epochs"])
        labelled = public.subset(labelled_public(scenario.seed, len(public),
                                                 int(config.get("public-pretrain-samples", len(public)))))
        train_local(model, labelled, modalities, epochs=epochs, batch_size=training.batch_size,
                    learning_rate=lr, seed=derive_seed(scenario.seed, "pretrain", device_id),
                    optimizer=training.optimizer)
        flops += per_sample * len(labelled) * epochs
    if "targets" in config:
        target_idx = np.asarray(config["target-indices"], dtype=np.int64)
        targets = decode_any(bytes(config["targets"]))
        epochs = int(config.get("distill-epochs", 1))
        distill_loss = distill_on(model, public.subset(target_idx), modalities, targets,
                                  epochs=epochs, batch_size=training.batch_size, learning_rate=lr,
                                  temperature=float(config.get("temperature", 1.0)),
                                  seed=derive_seed(scenario.seed, "digest", server_round, device_id))
        flops += per_sample * len(target_idx) * epochs
    epochs = int(config.get("local-epochs", training.local_epochs))
    outcome = train_local(model, device.data, modalities, epochs=epochs,
                          batch_size=training.batch_size, learning_rate=lr,
                          seed=derive_seed(scenario.seed, "train", server_round, device_id),
                          optimizer=training.optimizer, self_distillation=training.self_distillation)
    flops += per_sample * outcome.num_examples * epochs + outcome.extra_flops
    public_idx = np.asarray(config["public-indices"], dtype=np.int64)
    logits = predict_logits(model, public.subset(public_idx), modalities).numpy()
    flops += ctx.forward_flops_per_sample(tier, modalities) * len(public_idx)
    payload = get_codec(str(config.get("codec", "fp32"))).encode(logits)
    reply = RecordDict({
        "logits": ConfigRecord({"payload": payload}),
        "metrics": MetricRecord({"num-examples": outcome.num_examples, "train-loss": outcome.mean_loss,
                                 "distill-loss": distill_loss}),
        COST: cost_record(flops),
    })
    if fog_model is None:
        reply[STATE] = pack(state, key, model.state_dict())
    return Message(reply, reply_to=message)


def _strategy_records_config(message: Message) -> ConfigRecord:
    configs = [v for k, v in message.content.config_records.items() if not k.startswith(PREFIX)]
    return configs[0] if configs else ConfigRecord()


# Every task a device can be sent, by Flower message type (category, action).
HANDLERS: dict[tuple[str, str | None], Callable[[Scenario, Message], Message]] = {
    ("train", None): handle_train,
    ("train", "logits"): handle_logits,
    ("train", "gossip"): handle_gossip,
    ("train", "architecture"): handle_train,  # FedDF: the same task on the device's own architecture
    ("train", "teacher"): handle_teacher,
    ("query", "teacher"): handle_teacher_query,
    ("evaluate", None): handle_evaluate,
}


def make_client_app(scenario: Scenario | Callable[[Context], Scenario]) -> ClientApp:
    """A ClientApp for ``scenario``, or for the scenario a function finds in the
    run's context (as under ``flwr run``). The closure holds only the scenario."""
    app = ClientApp()
    scenario_of = scenario if callable(scenario) else (lambda context: scenario)
    for (category, action), handler in HANDLERS.items():
        register = getattr(app, category)
        (register(action) if action else register())(_bound(handler, scenario_of))
    return app


def _bound(handler, scenario_of):
    def run(message: Message, context: Context) -> Message:
        # One thread per task: the same numbers on every backend, and executors
        # running side by side do not fight over cores.
        torch.set_num_threads(1)
        return handler(scenario_of(context), message)

    return run
