"""FedGKT: devices train small models and ship features; a large server model learns from them, both distilling each other.

He, Annavaram & Avestimehr, "Group Knowledge Transfer: Federated Learning of
Large CNNs at the Edge", NeurIPS 2020, https://arxiv.org/abs/2007.14513.

What is followed (the paper's Algorithm 1, alternating minimisation):

- each device trains its own small model (fedkd's ``MultimodalNet`` of its
  tier on its sensors: the encoders are the feature extractor, the head the
  small classifier) with ``CE + alpha * KD`` towards the server's logits for
  its samples (CE alone before the server has any), KD at temperature
  ``temperature`` (the paper's T = 3) with Hinton's T^2 scaling;
- it then uploads, for every sample of its shard, the extracted feature
  (N x feature_dim), its logits (N x classes) and the label;
- the server trains a large server-side model on those features with
  ``CE + alpha * KD`` towards the device's logits, then sends each device the
  server model's logits for its samples, which the device distills from next
  time it is asked (the bidirectional transfer).
- Devices never exchange weights: their models are their own and travel in
  their state under the key ``fedkd.scoring.own_model`` reads.

Where fedkd departs:

- the server model is an MLP (``server_layers`` hidden layers of
  ``server_hidden`` units) on the fused feature vector, not the paper's
  ResNet-55/109 on feature maps: fedkd's encoders end in a vector;
- heterogeneous sensors and tiers: a device's feature is the mean over its
  own sensors' encoders (MultimodalNet's fusion) and its width is its tier's
  ``feature_dim``, so the server keeps **one model per (fog, feature width)**
  (one fog, numbered 0, without a topology): devices of one width share it
  whatever they sense, as the paper's server serves clients whose extractors
  differ (each trains its own);
- devices are sampled each round (``fraction_train``), so a device's server
  logits are those of the last round it took part in; the server trains on
  the round's uploads shuffled together (``server_epochs`` passes) rather
  than client by client;
- the server's compute is real and timed when the scenario has a topology:
  each fog trains its server model, and ``env.network.backhaul`` advances the
  clock by the slowest fog's FLOPs (no bytes cross the backhaul: the fog is
  the server; the call also adds the backhaul's round-trip latency). Without
  a topology it is not timed (fedkd has no cloud compute model);
- labels travel as uint8 (uint16 beyond 256 classes), features and logits
  through ``codec`` (fp32 by default), server logits through
  ``downlink_codec``.

Work runs where each model is (as ``fedkd.training``): a device's samples,
labels and server logits follow its model (``backend.torch_device``), the
server's features, logits and labels follow the server model (built on the
CPU), shuffles are drawn on the CPU (a GPU run sees the same batches) and
what goes back to numpy comes through the CPU.

Scoring: ``accuracy`` is each panel device's own small model (what runs at
the edge without the server, fedkd's protocol). ``accuracy_gkt_server`` is
the paper's measure: a panel device's own extractor followed by the server
model of its (fog, width), averaged over the panel devices that have
trained and whose server model exists.
"""
from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from torch import nn

from fedkd.codecs import decode_any, get_codec
from fedkd.contract import DeviceCall, FedkdStrategy
from fedkd.device_models import device_model, model_key, pack
from fedkd.distill import kd_loss
from fedkd.scoring import evaluation_panel, own_model
from fedkd.seeding import derive_seed
from fedkd.strategy_parts import NoClientEvaluation, check_sampling, sample_devices, weighted_reply_metrics
from fedkd.training import model_device, to_tensors

MESSAGE_TYPE = "train.gkt"


# -- the losses, shared by both sides ------------------------------------------
def gkt_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
             alpha: float, temperature: float) -> torch.Tensor:
    """FedGKT's objective on either side: CE(labels) + alpha * T^2 KL(softmax(teacher/T) || softmax(logits/T));
    CE alone without a teacher."""
    loss = F.cross_entropy(logits, labels)
    if teacher_logits is not None and alpha > 0:
        target = torch.softmax(teacher_logits / temperature, dim=-1)
        loss = loss + alpha * kd_loss(logits, target, temperature)
    return loss


def label_payload(labels: np.ndarray, num_classes: int) -> bytes:
    """Labels as the smallest unsigned integers that hold every class."""
    return np.ascontiguousarray(labels, dtype="<u1" if num_classes <= 256 else "<u2").tobytes()


def labels_of(payload: bytes, num_classes: int) -> np.ndarray:
    return np.frombuffer(payload, dtype="<u1" if num_classes <= 256 else "<u2").astype(np.int64)


# -- the device half --------------------------------------------------------------
def server_logits_of(config, n: int, device: torch.device | None = None) -> torch.Tensor | None:
    """The server's logits for the device's ``n`` samples in a task's ``config``, on ``device``
    (else the CPU); None when the server sent none."""
    if "server-logits" not in config:
        return None
    teacher = torch.from_numpy(np.ascontiguousarray(decode_any(bytes(config["server-logits"])), dtype=np.float32))
    if teacher.shape[0] != n:
        raise ValueError(f"{teacher.shape[0]} server logits for {n} local samples")
    return teacher if device is None else teacher.to(device)


def gkt_task(call: DeviceCall) -> Message:
    """``train.gkt``: train the device's own model with CE + KD from the server's logits for its
    samples (if it has any), then upload its features, logits and labels."""
    ctx, device = call.ctx, call.device
    config = call.config()
    training = call.scenario.training
    tier, modalities = device.model_tier, device.modalities
    data = device.data
    n = len(data)
    state = call.state
    model = device_model(ctx, call.device_id, tier, modalities, state)
    where = model_device(model)  # cpu or cuda (backend.torch_device); the draws stay on the cpu
    teacher = server_logits_of(config, n, where)
    epochs = int(config.get("local-epochs", training.local_epochs))
    alpha, temperature = float(config["alpha"]), float(config["temperature"])
    inputs = to_tensors(data, modalities, where)
    labels = torch.from_numpy(data.labels.astype(np.int64)).to(where)
    optimizer = (torch.optim.Adam if training.optimizer == "adam" else torch.optim.SGD)(
        model.parameters(), lr=training.learning_rate)
    generator = torch.Generator().manual_seed(call.seed("gkt-train", call.server_round, call.device_id))
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(where)
        for start in range(0, n, training.batch_size):
            idx = order[start:start + training.batch_size]
            loss = gkt_loss(model({m: x[idx] for m, x in inputs.items()}), labels[idx],
                            None if teacher is None else teacher[idx], alpha, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    # Extract: one forward pass gives the features and, through the head, the logits.
    model.eval()
    with torch.no_grad():
        features = model.features(inputs)
        logits = model.head(features)
    codec = get_codec(str(config["codec"]))
    flops = (ctx.train_flops_per_sample(tier, modalities) * n * epochs
             + ctx.forward_flops_per_sample(tier, modalities) * n)
    return call.reply({
        "upload": ConfigRecord({"features": codec.encode(features.cpu().numpy()),
                                "logits": codec.encode(logits.cpu().numpy()),
                                "labels": label_payload(data.labels, ctx.dataset.num_classes)}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": total / max(batches, 1)}),
    }, flops, state=pack(state, model_key(tier, modalities), model.state_dict()))


# -- the server half --------------------------------------------------------------
def server_model(feature_dim: int, num_classes: int, hidden: int, layers: int, seed: int) -> nn.Sequential:
    """The large server-side classifier on device features: an MLP, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        widths = [feature_dim] + [hidden] * layers
        blocks: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            blocks += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*blocks, nn.Linear(widths[-1], num_classes))


def mlp_flops_per_sample(model: nn.Sequential) -> tuple[int, int]:
    """(training, forward) FLOPs per sample of an MLP: 2 per multiply-add forward, the
    backward pass twice the forward (as fedkd.models.measure counts layers)."""
    forward = sum(2 * m.in_features * m.out_features for m in model if isinstance(m, nn.Linear))
    return 3 * forward, forward


class FedGKT(FedkdStrategy, NoClientEvaluation, Strategy):
    """FedGKT: small device models upload features and logits; a large server model learns from them and sends back its logits (He et al. 2020)."""

    shares_weights = False
    device_tasks = {MESSAGE_TYPE: gkt_task}

    def __init__(self, fraction_train: float = 0.1, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 temperature: float = 3.0, alpha: float = 1.0, server_epochs: int = 1,
                 server_hidden: int = 256, server_layers: int = 2, server_learning_rate: float | None = None,
                 server_batch_size: int = 64, local_epochs: int | None = None, codec: str = "fp32",
                 downlink_codec: str | None = None):
        """``alpha``: the weight of the KD term on both sides; ``server_*``: the server MLP and its
        training (learning rate: the scenario's when null); ``codec``: features and logits going up;
        ``downlink_codec``: the server's logits coming down (``codec`` when null)."""
        check_sampling(fraction_train, min_train_nodes, min_available_nodes)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if alpha < 0:
            raise ValueError(f"alpha must be 0 or more, got {alpha}")
        for name, value in (("server_epochs", server_epochs), ("server_hidden", server_hidden),
                            ("server_batch_size", server_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if server_layers < 0:
            raise ValueError(f"server_layers must be 0 or more, got {server_layers}")
        if server_learning_rate is not None and server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be positive or null, got {server_learning_rate}")
        if local_epochs is not None and local_epochs < 1:
            raise ValueError(f"local_epochs must be positive or null, got {local_epochs}")
        get_codec(codec), get_codec(downlink_codec or codec)  # fail now on a bad codec name
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.temperature, self.alpha = temperature, alpha
        self.server_epochs, self.server_hidden, self.server_layers = server_epochs, server_hidden, server_layers
        self.server_learning_rate, self.server_batch_size = server_learning_rate, server_batch_size
        self.local_epochs, self.codec, self.downlink_codec = local_epochs, codec, downlink_codec or codec
        # (fog, feature width) -> the server model; device -> the server's logits for its samples.
        self.models: dict[tuple[int, int], nn.Sequential] = {}
        self.server_logits: dict[int, np.ndarray] = {}
        self.device_slot: dict[int, tuple[int, int]] = {}  # device -> the (fog, width) that last taught it
        self.server_flops = 0.0  # all server models' training and inference so far
        self._fogs: dict[int, int] = {}  # this round's devices -> their fog (set by configure_train)

    # -- fedkd hooks --------------------------------------------------------------
    def fedkd_state(self) -> dict:
        """The server models, the logits each device will distill from, and the FLOPs count."""
        return {"models": {f"{fog}:{dim}": {k: v.clone() for k, v in m.state_dict().items()}
                           for (fog, dim), m in sorted(self.models.items())},
                "server_logits": {str(d): logits for d, logits in sorted(self.server_logits.items())},
                "device_slot": {str(d): list(slot) for d, slot in sorted(self.device_slot.items())},
                "server_flops": float(self.server_flops)}

    def fedkd_restore(self, state: dict) -> None:
        self.models = {}
        for slot, weights in state["models"].items():
            fog, dim = (int(x) for x in slot.split(":"))
            model = self._new_server_model(fog, dim, int(list(weights.values())[-1].shape[0]))
            model.load_state_dict(weights)
            self.models[(fog, dim)] = model
        self.server_logits = {int(d): np.asarray(v) for d, v in state["server_logits"].items()}
        self.device_slot = {int(d): (int(s[0]), int(s[1])) for d, s in state["device_slot"].items()}
        self.server_flops = float(state["server_flops"])

    def fedkd_round_metrics(self, ctx, device_state) -> dict[str, float]:
        """``accuracy_gkt_server``: the paper's measure, a panel device's own extractor followed by
        its server model, over panel devices the server has taught; and the server's FLOPs so far."""
        metrics = {"gkt_server_flops": float(self.server_flops)}
        scores = []
        test = ctx.test_split
        for device in evaluation_panel(ctx, ctx.scenario.evaluation.panel_devices):
            slot = self.device_slot.get(device.device_id)
            if slot is None or slot not in self.models:
                continue
            extractor = own_model(ctx, device, device_state).build().eval()
            head = self.models[slot].eval()
            with torch.no_grad():
                features = extractor.features(to_tensors(test, device.modalities, model_device(extractor)))
                logits = head(features.to(model_device(head))).cpu()
            scores.append(float((logits.argmax(1).numpy() == test.labels).mean()))
        if scores:
            metrics["accuracy_gkt_server"] = float(np.mean(scores))
        return metrics

    # -- Flower's Strategy API ----------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> FedGKT: fraction %.2f, T=%.2f, alpha %.2f, server MLP %dx%d, %d epochs, codec %s/%s",
            self.fraction_train, self.temperature, self.alpha, self.server_layers, self.server_hidden,
            self.server_epochs, self.codec, self.downlink_codec)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        node_ids = sample_devices(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        task = {"server-round": server_round, "temperature": float(self.temperature), "alpha": float(self.alpha),
                "codec": self.codec}
        if self.local_epochs is not None:
            task["local-epochs"] = int(self.local_epochs)
        downlink = get_codec(self.downlink_codec)
        messages = []
        for node in sorted(node_ids):
            record = dict(task)
            if node in self.server_logits:
                record["server-logits"] = downlink.encode(self.server_logits[node].astype(np.float32))
            messages.append(Message(RecordDict({"config": ConfigRecord(record)}), node, MESSAGE_TYPE))
        self._fogs = self._fogs_of(grid, sorted(node_ids))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        uploads: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = {}
        for reply in sorted(valid, key=lambda r: r.metadata.src_node_id):
            device = reply.metadata.src_node_id
            upload = reply.content["upload"]
            features = decode_any(bytes(upload["features"]))
            logits = decode_any(bytes(upload["logits"]))
            labels = labels_of(bytes(upload["labels"]), logits.shape[1])
            slot = (self._fogs.get(device, 0), int(features.shape[1]))
            uploads.setdefault(slot, []).append((device, features, logits, labels))
        fog_flops: dict[int, float] = {}
        for slot, group in sorted(uploads.items()):
            flops = self.train_server(slot, group, server_round)
            fog_flops[slot[0]] = fog_flops.get(slot[0], 0.0) + flops
        self.server_flops += sum(fog_flops.values())
        network = self.env.network
        if network is not None and getattr(network, "topology", None) is not None:
            network.backhaul({fog: (0, 0, flops) for fog, flops in sorted(fog_flops.items())})
        return None, weighted_reply_metrics(valid, "train-loss")

    # -- the server model ---------------------------------------------------------
    def train_server(self, slot: tuple[int, int], group: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                     server_round: int) -> float:
        """Train the server model of ``slot`` on the group's (device, features, logits, labels) with
        CE + alpha KD from the device logits; keep its logits for each device. Returns the FLOPs."""
        if slot not in self.models:
            self.models[slot] = self._new_server_model(*slot, num_classes=group[0][2].shape[1])
        model = self.models[slot]
        where = model_device(model)  # the draws stay on the cpu
        features = torch.from_numpy(np.concatenate([g[1] for g in group]).astype(np.float32)).to(where)
        teacher = torch.from_numpy(np.concatenate([g[2] for g in group]).astype(np.float32)).to(where)
        labels = torch.from_numpy(np.concatenate([g[3] for g in group])).to(where)
        lr = self.server_learning_rate or (self.env.ctx.scenario.training.learning_rate
                                           if self.env.ctx is not None else 1e-3)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(derive_seed(self._seed(), "gkt-server", server_round, *slot))
        model.train()
        for _ in range(self.server_epochs):
            order = torch.randperm(len(labels), generator=generator).to(where)
            for start in range(0, len(labels), self.server_batch_size):
                idx = order[start:start + self.server_batch_size]
                loss = gkt_loss(model(features[idx]), labels[idx], teacher[idx], self.alpha, self.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            for device, device_features, _, _ in group:
                inputs = torch.from_numpy(device_features.astype(np.float32)).to(where)
                self.server_logits[device] = model(inputs).cpu().numpy()
                self.device_slot[device] = slot
        train_flops, forward_flops = mlp_flops_per_sample(model)
        return float(train_flops * len(labels) * self.server_epochs + forward_flops * len(labels))

    def _new_server_model(self, fog: int, dim: int, num_classes: int) -> nn.Sequential:
        return server_model(dim, num_classes, self.server_hidden, self.server_layers,
                            derive_seed(self._seed(), "gkt-server-model", fog, dim))

    def _seed(self) -> int:
        return self.env.ctx.scenario.seed if self.env.ctx is not None else 0

    @staticmethod
    def _fogs_of(grid: Grid, node_ids: list[int]) -> dict[int, int]:
        """Each device's fog (0 for all without a topology): the server it talks to."""
        if not hasattr(grid, "node_profiles"):
            return {n: 0 for n in node_ids}
        return {n: int(p.fog) if p.fog is not None else 0 for n, p in grid.node_profiles(node_ids).items()}


__all__ = ["FedGKT", "gkt_loss", "gkt_task", "server_model"]
