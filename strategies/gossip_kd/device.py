"""gossip_kd's device half: one device's step of serverless gossip distillation (``train.gossip``).

The device receives the predictions its neighbours last sent it (records
``d2d.from.<sender>``: logits through a codec and the round they were made in,
which names the public samples they refer to), trains its own model on

    L_k = CE(own shard) + distill_weight * sum_j KD_T(public samples of j, softmax(z_j / T))

then predicts this round's public samples and replies with them under
``d2d.logits``, for the simulated grid to send to each neighbour over the
device-to-device radio. Nothing here talks to a server.

The two sums are taken together, batch by batch: one epoch is one pass over
the shard, each step paired with an equal share of the neighbours' samples;
the distillation term of a step is the mean over its samples times the number
of neighbours, an unbiased estimate of the sum over neighbours when each sent
as many samples. With ``aux-heads`` each neighbour j is distilled into a head
of its own on the shared features (after Zhmoginov et al. 2023), not into the
device's classifier, which then learns from the labels alone; the heads stay
with the device (its state) and never leave it.

The protocol's constants (``fedkd.gossip``: public batch size, codec,
temperature, weights) are what every device is configured with when it is
deployed, so the simulation hands them over uncounted, like ``fedkd.task``.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from torch import nn

from fedkd.codecs import decode_any, get_codec
from fedkd.contract import DeviceCall
from fedkd.data.base import Split
from fedkd.device_models import SEP, device_model, model_key, pack, unpack
from fedkd.distill import kd_loss, softmax
from fedkd.models.multimodal import MultimodalNet
from fedkd.seeding import derive_seed, rng_for
from fedkd.training import model_device, predict_logits, to_tensors

MESSAGE_TYPE = "train.gossip"
GOSSIP = "fedkd.gossip"  # ConfigRecord: the protocol's constants (uncounted, see above)
FROM = "d2d.from."  # + sender id: ConfigRecord {"payload": codec bytes, "round": int}
REPLY = "d2d.logits"  # the device's own predictions, for its neighbours
HEAD_PREFIX = "aux."  # aux.<neighbour>.weight / .bias inside the device's model state


def public_batch(seed: int, server_round: int, public_size: int, batch: int) -> np.ndarray:
    """The public samples every device predicts in ``server_round`` (sorted): known to all
    devices from the shared seed, so a message names them by its round alone."""
    rng = rng_for(seed, "gossip-public", server_round)
    return np.sort(rng.choice(public_size, min(batch, public_size), replace=False))


@dataclass(frozen=True)
class Teacher:
    """What one neighbour said: its soft labels (at the protocol's temperature) on some public samples."""

    sender: int
    indices: np.ndarray
    probs: np.ndarray  # (len(indices), classes)


@dataclass(frozen=True)
class GossipOutcome:
    num_examples: int
    mean_loss: float
    private_seen: int  # samples processed, counting repeats: for the FLOPs
    public_seen: int


def train_with_neighbours(model: MultimodalNet, private: Split, public: Split, modalities: Sequence[str],
                          teachers: Sequence[Teacher], *, epochs: int, batch_size: int, learning_rate: float,
                          temperature: float, distill_weight: float, seed: int, optimizer: str = "adam",
                          heads: nn.ModuleDict | None = None) -> GossipOutcome:
    """Minimise cross-entropy on ``private`` plus ``distill_weight`` times the sum over
    ``teachers`` of the KD loss towards each (see the module docstring)."""
    device = model_device(model)  # cpu or cuda (backend.torch_device); the draws stay on the cpu
    x_private = to_tensors(private, modalities, device)
    y_private = torch.from_numpy(private.labels.astype(np.int64)).to(device)
    n_private = len(y_private)
    steps = math.ceil(n_private / batch_size)
    if teachers:
        x_public = to_tensors(public.subset(np.concatenate([t.indices for t in teachers])), modalities, device)
        targets = torch.from_numpy(np.concatenate([t.probs for t in teachers]).astype(np.float32)).to(device)
        owner = torch.from_numpy(np.repeat(np.arange(len(teachers)), [len(t.indices) for t in teachers]))
        public_batch_size = math.ceil(len(targets) / steps)
    params = list(model.parameters()) + (list(heads.parameters()) if heads is not None else [])
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    cross_entropy = nn.CrossEntropyLoss()
    model.train()
    total, private_seen, public_seen = 0.0, 0, 0
    for _ in range(epochs):
        order = torch.randperm(n_private, generator=generator)
        public_order = torch.randperm(len(targets), generator=generator) if teachers else None
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = cross_entropy(model({m: x[idx] for m, x in x_private.items()}), y_private[idx])
            private_seen += len(idx)
            if teachers:
                pub = public_order[step * public_batch_size:(step + 1) * public_batch_size]
                if len(pub):
                    kd = _distillation(model, {m: x[pub] for m, x in x_public.items()}, targets[pub], owner[pub],
                                       teachers, temperature, heads)
                    loss = loss + distill_weight * len(teachers) * kd
                    public_seen += len(pub)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
    return GossipOutcome(n_private, total / max(steps * epochs, 1), private_seen, public_seen)


def _distillation(model: MultimodalNet, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                  owner: torch.Tensor, teachers: Sequence[Teacher], temperature: float,
                  heads: nn.ModuleDict | None) -> torch.Tensor:
    """Mean KD loss over a batch of neighbours' samples, each through its neighbour's head if any."""
    features = model.features(inputs)
    if heads is None:
        return kd_loss(model.head(features), targets, temperature)
    loss = features.new_zeros(())
    for position in torch.unique(owner).tolist():
        mine = owner == position
        head = heads[str(teachers[position].sender)]
        loss = loss + kd_loss(head(features[mine]), targets[mine], temperature) * (mine.sum() / len(owner))
    return loss


def split_heads(weights: OrderedDict | None) -> tuple[OrderedDict | None, dict[str, torch.Tensor]]:
    """A device's saved weights as (its model's, its neighbour heads')."""
    if weights is None:
        return None, {}
    model = OrderedDict((n, w) for n, w in weights.items() if not n.startswith(HEAD_PREFIX))
    return model, {n: w for n, w in weights.items() if n.startswith(HEAD_PREFIX)}


def strip_heads(state: ArrayRecord | None) -> ArrayRecord | None:
    """``state`` without the neighbour heads: only the models a device runs."""
    if state is None:
        return None
    kept = OrderedDict((name, array) for name, array in state.items()
                       if not name.split(SEP)[-1].startswith(HEAD_PREFIX))
    return ArrayRecord(kept)


def _heads_for(senders: Sequence[int], saved: dict[str, torch.Tensor], model: MultimodalNet, classes: int,
               seed: int, device_id: int) -> nn.ModuleDict:
    """The device's head for each neighbour: the one it kept, or a new one (seeded per pair)."""
    heads = nn.ModuleDict()
    for sender in sorted(set(senders) | {int(n.split(".")[1]) for n in saved}):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "aux-head", device_id, sender))
            head = nn.Linear(model.feature_dim, classes)
        prefix = f"{HEAD_PREFIX}{sender}."
        if prefix + "weight" in saved:
            head.load_state_dict({"weight": saved[prefix + "weight"], "bias": saved[prefix + "bias"]})
        heads[str(sender)] = head
    return heads.to(model_device(model))  # seeded on the cpu, trained where the model is


def gossip_task(call: DeviceCall) -> Message:
    """The device task ``train.gossip``: learn from the neighbours' predictions, predict for them."""
    ctx, device, scenario, message = call.ctx, call.device, call.scenario, call.message
    device_id, server_round = call.device_id, call.server_round
    protocol = message.content[GOSSIP]
    training = scenario.training
    tier, modalities = device.model_tier, device.modalities
    key = model_key(tier, modalities)
    state = call.state
    _, saved_heads = split_heads(unpack(state, key))
    model = device_model(ctx, device_id, tier, modalities, strip_heads(state))
    public = ctx.dataset.split("public")
    batch, temperature = int(protocol["public-batch"]), float(protocol["temperature"])
    distill_weight = float(protocol["distill-weight"])
    teachers = []
    heard = {int(name[len(FROM):]): record for name, record in message.content.config_records.items()
             if name.startswith(FROM)}
    for sender, record in sorted(heard.items()) if distill_weight > 0 else ():  # 0: hear them, learn nothing
        idx = public_batch(scenario.seed, int(record["round"]), len(public), batch)
        logits = decode_any(bytes(record["payload"]))
        if len(logits) != len(idx):
            raise ValueError(f"{FROM}{sender}: {len(logits)} predictions for {len(idx)} public samples")
        teachers.append(Teacher(sender, idx, softmax(logits, temperature)))
    heads = (_heads_for([t.sender for t in teachers], saved_heads, model, ctx.dataset.num_classes,
                        scenario.seed, device_id) if bool(protocol["aux-heads"]) else None)
    epochs = int(protocol.get("local-epochs", training.local_epochs))
    outcome = train_with_neighbours(
        model, device.data, public, modalities, teachers, epochs=epochs, batch_size=training.batch_size,
        learning_rate=float(protocol.get("learning-rate", training.learning_rate)), temperature=temperature,
        distill_weight=distill_weight,
        seed=derive_seed(scenario.seed, "gossip-train", server_round, device_id), optimizer=training.optimizer,
        heads=heads)
    asked = public_batch(scenario.seed, server_round, len(public), batch)
    logits = predict_logits(model, public.subset(asked), modalities).numpy()
    flops = (ctx.train_flops_per_sample(tier, modalities) * (outcome.private_seen + outcome.public_seen)
             + ctx.forward_flops_per_sample(tier, modalities) * len(asked))
    keep = OrderedDict(model.state_dict())
    if heads is not None:
        # A head costs one multiply-add per feature and class, three times over (forward and backward).
        flops += 6 * model.feature_dim * ctx.dataset.num_classes * outcome.public_seen
        keep.update({f"{HEAD_PREFIX}{s}.{p}": w for s, head in heads.items() for p, w in head.state_dict().items()})
    payload = get_codec(str(protocol["codec"])).encode(logits)
    return call.reply({REPLY: ConfigRecord({"payload": payload, "round": server_round})}, flops,
                      state=pack(state, key, keep))
