"""teacher_kd's device half: a teacher labels the device's unlabeled
stream, and the device's own student learns from those soft labels alone.

Two messages (see ``strategy.py`` for the server side):

- ``query.teacher`` (teacher at the edge, first leg): the device uploads its
  unlabeled samples in the modalities the teacher reads. Nothing is learned.
- ``train.teacher``: the device receives either the teacher's weights (an
  ``ArrayRecord`` ``teacher``; the device runs the teacher itself) or the
  teacher's soft labels for the samples it uploaded (``soft-labels`` in the
  config), then trains its student on its inputs towards them with the KD
  loss. The labels of its shard are never read.

The student is the device's own model (its tier, its sensors); it travels in
the device's state under its ``fedkd.device_models`` key, as in ``fedkd.logit_exchange.logits_task``.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from torch import nn

from fedkd.codecs import decode_any
from fedkd.contract import DeviceCall
from fedkd.device_models import device_model, model_key, pack
from fedkd.distill import distill_on, softmax
from fedkd.training import model_device


@torch.no_grad()
def soft_labels(teacher: nn.Module, inputs: Mapping[str, np.ndarray], temperature: float,
                batch_size: int = 1024) -> np.ndarray:
    """The teacher's probabilities at temperature T for unlabeled ``inputs`` (one array per modality)."""
    teacher.eval()
    device = model_device(teacher)  # cpu or cuda (backend.torch_device)
    tensors = {m: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device) for m, x in inputs.items()}
    n = len(next(iter(tensors.values())))
    logits = [teacher({m: x[s:s + batch_size] for m, x in tensors.items()}) for s in range(0, n, batch_size)]
    return softmax(torch.cat(logits).cpu().numpy().astype(np.float64), temperature).astype(np.float32)


def query_task(call: DeviceCall) -> Message:
    """``query.teacher``: upload the device's unlabeled samples, in the modalities the teacher reads."""
    device = call.device
    reads = [m for m in call.message.content["config"]["teacher-modalities"] if m in device.modalities]
    if not reads:
        raise ValueError(f"device senses {list(device.modalities)}, none of which the teacher reads")
    samples = ArrayRecord({m: Array(np.ascontiguousarray(device.data.inputs[m])) for m in reads})
    return call.reply({"samples": samples}, 0.0)


def teach_task(call: DeviceCall) -> Message:
    """``train.teacher``: label the local samples with the teacher (or take the edge's labels);
    train the student on them."""
    ctx, device, message = call.ctx, call.device, call.message
    config = message.content["config"]
    training = call.scenario.training
    temperature = float(config["temperature"])
    key = model_key(device.model_tier, device.modalities)
    state = call.state
    student = device_model(ctx, call.device_id, device.model_tier, device.modalities, state)
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
                         seed=call.seed("teacher-kd", call.server_round, call.device_id))
    flops += ctx.train_flops_per_sample(device.model_tier, device.modalities) * len(device.data) * epochs
    return call.reply({"metrics": MetricRecord({"num-examples": len(device.data), "kd-loss": kd_loss})}, flops,
                      state=pack(state, key, student.state_dict()))
