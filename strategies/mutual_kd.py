"""mutual_kd: FedKD's private mentor and shared mentee, adaptive mutual distillation, SVD-compressed updates.

Wu, Wu, Lyu, Qi, Huang & Xie, "Communication-efficient federated learning via
knowledge distillation", Nature Communications 13, 2032 (2022),
https://arxiv.org/abs/2108.13323.

What is followed:

- every device keeps a **mentor**, its own model (its tier, its sensors), that
  never leaves it, and trains a **mentee**, a small shared model
  (``mentee_tier``), on its shard; both learn from the labels and from each
  other with the paper's adaptive mutual distillation: per batch,
  ``L_mentor = CE_mentor + KL(p_mentee || p_mentor) / (CE_mentor + CE_mentee)``
  and ``L_mentee = CE_mentee + KL(p_mentor || p_mentee) / (CE_mentor + CE_mentee)``
  (a teacher's predictions count more when both models already fit the
  labels). The KL target is the other model's detached prediction, and the
  scale ``1 / (CE_mentor + CE_mentee)`` is detached too: it weighs the
  distillation, it is not a loss to minimise (dividing by a CE the gradient
  can reach would push the CE up);
- only the mentee's **update** (new - received weights) goes up, each weight
  matrix (a conv kernel reshaped to out x rest) compressed by truncated SVD
  keeping the fewest singular values whose energy ``sum sigma_i^2`` reaches
  the fraction ``T`` of the total, sent as its factors U_k (m x k), sigma_k,
  V_k (k x n) through ``factor_codec`` (fp32: the paper's). A matrix whose
  factors' payloads would not be smaller than its own goes whole (the paper
  always factorises); vectors (biases) go whole, as in the paper;
- ``T`` follows the paper's dynamic schedule, from ``T_start`` (0.95) to
  ``T_end`` (0.98) linearly over the run: ``T_t = T_start + (T_end -
  T_start) * t / R`` in round t of R;
- the server averages the decompressed updates, weighted by the devices'
  examples, **per parameter over the devices that hold it** (a device holds
  only its own sensors' mentee encoders and the head, as in fedavg_modal),
  adds the mean to the global mentee, and sends it back compressed the same
  way.

Where fedkd departs:

- **the downlink** is the SVD of the global mentee's change since its seeded
  start (``G_t - G_0``), not of the last round's aggregated update: devices
  are sampled (``fraction_train``), so most missed the previous rounds and
  one round's update would not bring their copy up to date. Every device
  rebuilds ``G_0`` from the run's seed, so it needs no copy of its own; the
  mentee is therefore not kept in device state. The downlink may grow in
  rank as the run goes on, and fedkd counts every byte of it;
- the hidden-state and attention losses (``L_h``, ``L_a``) are dropped:
  the mentor's and mentee's features differ in width (a tier's
  ``feature_dim``), and the paper's are transformer hidden states;
- heterogeneous sensors: one mentee architecture per sensor set (the
  ``mentee_tier`` MultimodalNet over the device's sensors), one global
  mentee holding every sensor's encoder, as fedavg_modal;
- FLOPs: both models' training per sample (forward and backward) times
  samples and epochs, plus the SVD of each uploaded matrix (Golub & Van
  Loan's R-SVD count, 6 m n^2 + 20 n^3 for m >= n) and rebuilding the
  downloaded matrices (2 m n k). The server's own SVDs are not timed
  (fedkd has no cloud compute model).

Both models run where the context places them (``backend.torch_device``, as
``fedkd.training``): the device's samples and labels follow them, shuffles are
drawn on the CPU (a GPU run sees the same batches) and weights go back to
numpy through the CPU.

Scoring: a panel device runs its **mentor** (fedkd's own-model default: the
mentor travels in device state under ``fedkd.device_models.model_key`` of its
registered tier and sensors, the key ``fedkd.scoring.own_model`` reads).
``accuracy_mentee`` is the global mentee on the panel devices' sensors.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedkd.codecs import decode_any, get_codec
from fedkd.contract import DeviceCall, FedkdStrategy, StrategyEnv
from fedkd.device_models import device_model, model_key, pack
from fedkd.models import TIERS
from fedkd.scoring import evaluation_panel
from fedkd.seeding import derive_seed
from fedkd.strategy_parts import NoClientEvaluation, check_sampling, sample_devices, weighted_reply_metrics
from fedkd.training import accuracy, model_device, to_tensors

MESSAGE_TYPE = "train.mutual"
FACTOR_SEP = "|"  # "<parameter>|u", "|s", "|v" for SVD factors, "<parameter>|dense" for a whole array
ENCODERS = "encoders."  # MultimodalNet: encoders.<modality>.*, head.*


# -- the maths, plain and testable by hand -----------------------------------------
def threshold_at(server_round: int, total_rounds: int, t_start: float, t_end: float) -> float:
    """The paper's dynamic energy threshold: T_start + (T_end - T_start) * t / R."""
    return t_start + (t_end - t_start) * min(server_round, total_rounds) / max(total_rounds, 1)


def rank_for_energy(singular_values: np.ndarray, threshold: float) -> int:
    """The fewest leading singular values whose energy (sum of squares) reaches ``threshold`` of the total."""
    energy = np.square(np.asarray(singular_values, dtype=np.float64))
    total = energy.sum()
    if total <= 0:
        return 0
    # A small tolerance so that T = 1 keeps every non-zero value despite rounding.
    return int(np.searchsorted(np.cumsum(energy), threshold * total * (1 - 1e-12)) + 1)


def svd_flops(m: int, n: int) -> float:
    """Golub & Van Loan's R-SVD count for U, Sigma, V of an m x n matrix: 6 m n^2 + 20 n^3 (m >= n)."""
    m, n = max(m, n), min(m, n)
    return float(6 * m * n * n + 20 * n ** 3)


def compress(delta: Mapping[str, np.ndarray], threshold: float, codec: str) -> tuple[dict[str, bytes], float]:
    """Each array of ``delta`` as payload entries: SVD factors of a matrix truncated at energy
    ``threshold``, or the whole array (as a matrix) when the factors' payloads would be no
    smaller, and vectors whole; all-zero arrays are left out (they decode to zero). Returns the entries and the FLOPs of the SVDs."""
    chosen = get_codec(codec)
    encode, size = chosen.encode, chosen.encoded_size
    entries: dict[str, bytes] = {}
    flops = 0.0
    for name, array in delta.items():
        array = np.asarray(array, dtype=np.float64)
        if not np.any(array):
            continue
        if array.ndim < 2:
            entries[name + FACTOR_SEP + "dense"] = encode(array.astype(np.float32))
            continue
        matrix = array.reshape(array.shape[0], -1)
        m, n = matrix.shape
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        flops += svd_flops(m, n)
        k = rank_for_energy(s, threshold)
        if size(m, k) + size(1, k) + size(k, n) >= size(m, n):  # the factors, headers included
            entries[name + FACTOR_SEP + "dense"] = encode(matrix.astype(np.float32))
            continue
        entries[name + FACTOR_SEP + "u"] = encode(u[:, :k].astype(np.float32))
        entries[name + FACTOR_SEP + "s"] = encode(s[:k].astype(np.float32))
        entries[name + FACTOR_SEP + "v"] = encode(vt[:k].astype(np.float32))
    return entries, flops


def decompress(entries: Mapping[str, bytes], shapes: Mapping[str, tuple[int, ...]]
               ) -> tuple[dict[str, np.ndarray], float]:
    """The arrays ``compress`` sent, shaped as ``shapes`` says (only those present), and the
    FLOPs of rebuilding them from their factors (2 m n k)."""
    out: dict[str, np.ndarray] = {}
    flops = 0.0
    for key in entries:
        name, _, part = key.rpartition(FACTOR_SEP)
        if name not in shapes:
            raise ValueError(f"update for {name!r}, which this model does not have")
        if part == "dense":
            out[name] = decode_any(bytes(entries[key])).astype(np.float64).reshape(shapes[name])
        elif part == "u":
            u = decode_any(bytes(entries[key])).astype(np.float64)
            s = decode_any(bytes(entries[name + FACTOR_SEP + "s"])).astype(np.float64).reshape(-1)
            v = decode_any(bytes(entries[name + FACTOR_SEP + "v"])).astype(np.float64)
            out[name] = ((u * s) @ v).reshape(shapes[name])
            flops += 2.0 * u.shape[0] * v.shape[1] * len(s)
    return out, flops


def mutual_losses(mentor_logits: torch.Tensor, mentee_logits: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FedKD's adaptive mutual distillation on one batch: (mentor loss, mentee loss, CE mentor, CE mentee).

    Each model's loss is its CE plus KL(other's detached prediction || its own) / (CE_mentor + CE_mentee),
    the scale detached."""
    ce_t = F.cross_entropy(mentor_logits, labels)
    ce_s = F.cross_entropy(mentee_logits, labels)
    scale = 1.0 / (ce_t + ce_s).detach()
    log_t, log_s = F.log_softmax(mentor_logits, -1), F.log_softmax(mentee_logits, -1)
    kl_t = F.kl_div(log_t, log_s.detach(), reduction="batchmean", log_target=True)  # KL(p_s || p_t)
    kl_s = F.kl_div(log_s, log_t.detach(), reduction="batchmean", log_target=True)  # KL(p_t || p_s)
    return ce_t + kl_t * scale, ce_s + kl_s * scale, ce_t, ce_s


def per_parameter_mean(updates: list[dict[str, np.ndarray]], weights: list[float],
                       sensors: list[tuple[str, ...]], shapes: Mapping[str, tuple[int, ...]]
                       ) -> dict[str, np.ndarray]:
    """Each parameter's weighted mean over the devices that hold it (a sensor's encoder only
    over the devices with that sensor, the head over all). A held parameter missing from an
    update did not change (compress leaves out zeros); one nobody holds does not change."""
    mean = {}
    for name, shape in shapes.items():
        held = [(u.get(name, np.zeros(shape)), w) for u, w, s in zip(updates, weights, sensors) if holds(name, s)]
        total = sum(w for _, w in held)
        mean[name] = sum(w * a for a, w in held) / total if held and total > 0 else np.zeros(shape)
    return mean


def holds(name: str, modalities: Iterable[str]) -> bool:
    """Whether a device with ``modalities`` has mentee parameter ``name``."""
    if not name.startswith(ENCODERS):
        return True
    return name[len(ENCODERS):].split(".", 1)[0] in set(modalities)


# -- the device half ------------------------------------------------------------------
def initial_mentee(ctx, tier: str) -> dict[str, np.ndarray]:
    """The global mentee's seeded start G_0 over every modality: every process builds the same."""
    model = ctx.new_model(tier, seed=derive_seed(ctx.scenario.seed, "mutual-kd-mentee"))
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def mutual_task(call: DeviceCall) -> Message:
    """``train.mutual``: rebuild the mentee (G_0 + the sent change), train mentor and mentee
    together with adaptive mutual distillation, upload the mentee's update SVD-compressed."""
    ctx, device = call.ctx, call.device
    config = call.message.content["config"]  # two ConfigRecords: "config" and "mentee"
    training = call.scenario.training
    modalities, data = device.modalities, device.data
    n = len(data)
    mentee_tier = str(config["mentee-tier"])
    start = {k: v for k, v in initial_mentee(ctx, mentee_tier).items() if holds(k, modalities)}
    shapes = {k: v.shape for k, v in start.items()}
    change, rebuild_flops = decompress(call.message.content["mentee"], shapes)
    received = {k: start[k] + change.get(k, 0.0) for k in start}
    mentee = ctx.new_model(mentee_tier, modalities=modalities)
    mentee.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in received.items()})
    state = call.state
    mentor = device_model(ctx, call.device_id, device.model_tier, modalities, state)
    where = model_device(mentor)  # cpu or cuda (backend.torch_device); the draws stay on the cpu
    mentee.to(where)  # each batch feeds both: keep them together (a no-op, the context built both)
    epochs = int(config.get("local-epochs", training.local_epochs))
    optimizer = torch.optim.Adam if training.optimizer == "adam" else torch.optim.SGD
    opt_t = optimizer(mentor.parameters(), lr=training.learning_rate)
    opt_s = optimizer(mentee.parameters(), lr=training.learning_rate)
    inputs = to_tensors(data, modalities, where)
    labels = torch.from_numpy(data.labels.astype(np.int64)).to(where)
    generator = torch.Generator().manual_seed(call.seed("mutual-kd", call.server_round, call.device_id))
    mentor.train(), mentee.train()
    sums, batches = np.zeros(4), 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(where)
        for begin in range(0, n, training.batch_size):
            idx = order[begin:begin + training.batch_size]
            batch = {m: x[idx] for m, x in inputs.items()}
            losses = mutual_losses(mentor(batch), mentee(batch), labels[idx])
            opt_t.zero_grad(set_to_none=True), opt_s.zero_grad(set_to_none=True)
            (losses[0] + losses[1]).backward()  # the two losses share no parameters
            opt_t.step(), opt_s.step()
            sums += [float(x.detach()) for x in losses]
            batches += 1
    trained = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in mentee.state_dict().items()}
    update, svd_cost = compress({k: trained[k] - received[k] for k in trained},
                                float(config["energy-threshold"]), str(config["factor-codec"]))
    flops = ((ctx.train_flops_per_sample(device.model_tier, modalities)
              + ctx.train_flops_per_sample(mentee_tier, modalities)) * n * epochs + svd_cost + rebuild_flops)
    means = sums / max(batches, 1)
    return call.reply({
        "update": ConfigRecord(update),
        "metrics": MetricRecord({"num-examples": n, "mentor-loss": float(means[0]), "mentee-loss": float(means[1]),
                                 "mentor-ce": float(means[2]), "mentee-ce": float(means[3])}),
    }, flops, state=pack(state, model_key(device.model_tier, modalities), mentor.state_dict()))


# -- the server half ------------------------------------------------------------------
class MutualKD(FedkdStrategy, NoClientEvaluation, Strategy):
    """FedKD: private mentors and a shared mentee learn from each other; mentee updates travel SVD-compressed (Wu et al. 2022)."""

    shares_weights = False
    device_tasks = {MESSAGE_TYPE: mutual_task}

    def __init__(self, fraction_train: float = 0.1, min_train_nodes: int = 2, min_available_nodes: int = 2,
                 mentee_tier: str = "tiny", t_start: float = 0.95, t_end: float = 0.98,
                 local_epochs: int | None = None, factor_codec: str = "fp32"):
        """``mentee_tier``: the shared small model; ``t_start``/``t_end``: the SVD energy threshold
        over the run; ``factor_codec``: how the SVD factors travel."""
        check_sampling(fraction_train, min_train_nodes, min_available_nodes)
        if mentee_tier not in TIERS:
            raise ValueError(f"mentee_tier must be one of {sorted(TIERS)}, got {mentee_tier!r}")
        for name, value in (("t_start", t_start), ("t_end", t_end)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if local_epochs is not None and local_epochs < 1:
            raise ValueError(f"local_epochs must be positive or null, got {local_epochs}")
        get_codec(factor_codec)  # fail now on a bad codec name
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.min_available_nodes, self.mentee_tier = min_available_nodes, mentee_tier
        self.t_start, self.t_end = t_start, t_end
        self.local_epochs, self.factor_codec = local_epochs, factor_codec
        self.origin: dict[str, np.ndarray] | None = None  # G_0
        self.mentee: dict[str, np.ndarray] | None = None  # G_t
        self.total_rounds = 1
        self._round_threshold = t_start
        self._sensors: dict[int, tuple[str, ...]] = {}  # this round's devices -> the sensors they train
        self._mentee_scores: dict[str, float] | None = None

    # -- fedkd hooks --------------------------------------------------------------
    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before round 1: the global mentee's seeded start, and the run's length for the T schedule."""
        super().fedkd_setup(env)
        self.origin = initial_mentee(env.ctx, self.mentee_tier)
        if self.mentee is None:
            self.mentee = {k: v.copy() for k, v in self.origin.items()}
        self.total_rounds = int(env.ctx.scenario.rounds)

    def fedkd_state(self) -> dict:
        """The global mentee (G_0 is rebuilt from the seed)."""
        return {"mentee": {k: v.copy() for k, v in self.mentee.items()}}

    def fedkd_restore(self, state: dict) -> None:
        self.mentee = {k: np.asarray(v, dtype=np.float64).copy() for k, v in state["mentee"].items()}
        self._mentee_scores = None

    def fedkd_round_metrics(self, ctx, device_state) -> dict[str, float]:
        """``accuracy_mentee``: the global mentee on each panel device's sensors, averaged over the panel."""
        if self._mentee_scores is None:
            by_sensors: dict[tuple[str, ...], float] = {}
            scores = []
            for device in evaluation_panel(ctx, ctx.scenario.evaluation.panel_devices):
                if device.modalities not in by_sensors:
                    model = ctx.new_model(self.mentee_tier, modalities=device.modalities)
                    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in self.mentee.items()
                                           if holds(k, device.modalities)})
                    by_sensors[device.modalities] = accuracy(model, ctx.test_split, device.modalities)
                scores.append(by_sensors[device.modalities])
            self._mentee_scores = {"accuracy_mentee": float(np.mean(scores))}
        return dict(self._mentee_scores)

    # -- Flower's Strategy API ----------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> MutualKD: mentee %s, T %.3f -> %.3f over %d rounds, factors %s, fraction %.2f",
            self.mentee_tier, self.t_start, self.t_end, self.total_rounds, self.factor_codec, self.fraction_train)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.mentee is None:
            raise RuntimeError("MutualKD needs fedkd_setup() before round 1")
        node_ids = sample_devices(grid, self.fraction_train, self.min_train_nodes, self.min_available_nodes)
        node_ids = sorted(node_ids)
        self._round_threshold = threshold_at(server_round, self.total_rounds, self.t_start, self.t_end)
        # G_t - G_0, compressed once; each device gets the entries of the parameters it holds.
        entries, _ = compress({k: self.mentee[k] - self.origin[k] for k in self.mentee},
                              self._round_threshold, self.factor_codec)
        task = {"server-round": server_round, "mentee-tier": self.mentee_tier,
                "energy-threshold": float(self._round_threshold), "factor-codec": self.factor_codec}
        if self.local_epochs is not None:
            task["local-epochs"] = int(self.local_epochs)
        if not hasattr(grid, "node_profiles"):
            raise RuntimeError("MutualKD needs each device's sensors: run it on fedkd's simulated grid "
                               "(grid.node_profiles)")
        profiles = grid.node_profiles(node_ids)
        self._sensors = {node: tuple(profiles[node].modalities) for node in node_ids}
        messages = []
        for node in node_ids:
            sensors = self._sensors[node]
            mine = ConfigRecord({k: v for k, v in entries.items() if holds(k.rpartition(FACTOR_SEP)[0], sensors)})
            messages.append(Message(RecordDict({"mentee": mine, "config": ConfigRecord(task)}), node, MESSAGE_TYPE))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [r for r in replies if not r.has_error()]
        if not valid:
            return None, None
        shapes = {k: v.shape for k, v in self.mentee.items()}
        updates, weights, sensors = [], [], []
        for reply in sorted(valid, key=lambda r: r.metadata.src_node_id):
            device = reply.metadata.src_node_id
            if device not in self._sensors:
                raise RuntimeError(f"a reply from device {device}, which was not asked this round")
            update, _ = decompress(reply.content["update"], shapes)
            if any(not holds(name, self._sensors[device]) for name in update):
                raise ValueError(f"device {device} sent updates for encoders of sensors it lacks")
            updates.append(update)
            weights.append(float(reply.content["metrics"]["num-examples"]))
            sensors.append(self._sensors[device])
        mean = per_parameter_mean(updates, weights, sensors, shapes)
        self.mentee = {k: self.mentee[k] + mean[k] for k in self.mentee}
        self._mentee_scores = None
        metrics = weighted_reply_metrics(valid, "mentor-loss")
        metrics["mentee-loss"] = weighted_reply_metrics(valid, "mentee-loss")["mentee-loss"]
        return None, metrics


__all__ = ["MutualKD", "compress", "decompress", "mutual_losses", "mutual_task", "per_parameter_mean",
           "rank_for_energy", "threshold_at"]
