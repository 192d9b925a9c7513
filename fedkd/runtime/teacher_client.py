"""The device side of ``teacher_kd``: a teacher labels the device's unlabeled
stream, and the device's own student learns from those soft labels alone.

Two messages (see ``strategies/teacher_kd.py`` for the server side):

- ``query.teacher`` (teacher at the edge, first leg): the device uploads its
  unlabeled samples in the modalities the teacher reads. Nothing is learned.
- ``train.teacher``: the device receives either the teacher's weights (an
  ``ArrayRecord`` ``teacher``; the device runs the teacher itself) or the
  teacher's soft labels for the samples it uploaded (``soft-labels`` in the
  config), then trains its student on its inputs towards them with the KD
  loss. The labels of its shard are never read.

The student is the device's own model (its tier, its sensors); it travels in
the device's state under its ``fedkd.device_models`` key, as in ``handle_logits``.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from torch import nn

from ..codecs import decode_any
from ..device_models import model_key, pack, unpack
from ..distill import distill_on, softmax
from ..scenario import Scenario
from ..seeding import derive_seed
from .context import simulation_context
from .records import COST, STATE, cost_record, task_of


@torch.no_grad()
def soft_labels(teacher: nn.Module, inputs: Mapping[str, np.ndarray], temperature: float,
                batch_size: int = 1024) -> np.ndarray:
    """The teacher's probabilities at temperature T for unlabeled ``inputs`` (one array per modality)."""
    teacher.eval()
    tensors = {m: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for m, x in inputs.items()}
    n = len(next(iter(tensors.values())))
    logits = [teacher({m: x[s:s + batch_size] for m, x in tensors.items()}) for s in range(0, n, batch_size)]
    return softmax(torch.cat(logits).numpy().astype(np.float64), temperature).astype(np.float32)


def handle_teacher_query(scenario: Scenario, message: Message) -> Message:
    """Upload the device's unlabeled samples, in the modalities the teacher reads."""
    device = simulation_context(scenario).device(int(task_of(message)["device_id"]))
    reads = [m for m in message.content["config"]["teacher-modalities"] if m in device.modalities]
    if not reads:
        raise ValueError(f"device senses {list(device.modalities)}, none of which the teacher reads")
    samples = ArrayRecord({m: Array(np.ascontiguousarray(device.data.inputs[m])) for m in reads})
    return Message(RecordDict({"samples": samples, COST: cost_record(0.0)}), reply_to=message)


def handle_teacher(scenario: Scenario, message: Message) -> Message:
    """Label the local samples with the teacher (or take the edge's labels); train the student on them."""
    task = task_of(message)
    device_id, server_round = int(task["device_id"]), int(task["round"])
    ctx = simulation_context(scenario)
    device = ctx.device(device_id)
    config = message.content["config"]
    training = scenario.training
    temperature = float(config["temperature"])
    key = model_key(device.model_tier, device.modalities)
    student = ctx.new_model(device.model_tier, seed=derive_seed(scenario.seed, "device-model", device_id, key),
                            modalities=device.modalities)
    state = message.content.get(STATE)
    weights = unpack(state, key)
    if weights is not None:
        student.load_state_dict(weights)
    flops = 0.0
    if "teacher" in message.content:
        reads = tuple(config["teacher-modalities"])
        teacher = ctx.new_model(str(config["teacher-tier"]), modalities=reads)
        teacher.load_state_dict(message.content["teacher"].to_torch_state_dict())
        # Labelled once per task: the teacher is fixed, so every epoch reuses the same targets.
        targets = soft_labels(teacher, {m: device.data.inputs[m] for m in reads}, temperature)
        flops += ctx.forward_flops_per_sample(str(config["teacher-tier"]), reads) * len(device.data)
    else:
        targets = decode_any(bytes(config["soft-labels"]))
    if len(targets) != len(device.data):
        raise ValueError(f"{len(targets)} soft labels for {len(device.data)} local samples")
    epochs = int(config.get("local-epochs", training.local_epochs))
    kd_loss = distill_on(student, device.data, device.modalities, targets, epochs=epochs,
                         batch_size=training.batch_size, learning_rate=training.learning_rate,
                         temperature=temperature,
                         seed=derive_seed(scenario.seed, "teacher-kd", server_round, device_id))
    flops += ctx.train_flops_per_sample(device.model_tier, device.modalities) * len(device.data) * epochs
    return Message(RecordDict({
        "metrics": MetricRecord({"num-examples": len(device.data), "kd-loss": kd_loss}),
        STATE: pack(state, key, student.state_dict()),
        COST: cost_record(flops),
    }), reply_to=message)
