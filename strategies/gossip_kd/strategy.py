"""Gossip KD: serverless distillation between neighbours on a device-to-device graph (Bistritz et al. 2020).

Bistritz, Mann & Bambos, "Distributed Distillation for On-Device Learning",
NeurIPS 2020,
https://proceedings.neurips.cc/paper/2020/hash/fef6f971605336724b5e6c0c12dc2534-Abstract.html:
devices exchange soft decisions on batches of a shared unlabeled reference
set with their neighbours only, and each minimises its own loss plus a
distillation term towards each neighbour. Optional auxiliary heads, one per
neighbour, follow Zhmoginov et al., "Decentralized Learning with
Multi-Headed Distillation", CVPR 2023, https://arxiv.org/abs/2211.15774.

There is no aggregator. This class is only the simulation's orchestrator;
each round it

1. takes the devices online now;
2. builds the round's device-to-device graph over them (:mod:`.topology`:
   ``ring``, ``k_regular``, ``geometric``, ``time_varying``);
3. wakes all of them, or with ``fraction_train`` below 1 a seeded share
   of them (at least ``min_available_nodes``), as randomized gossip wakes
   devices at random (Boyd, Ghosh, Prabhakar & Shah, "Randomized Gossip
   Algorithms", IEEE Trans. Inf. Theory 52(6), 2006): a like-for-like
   participation with the server strategies' ``fraction_train``;
4. hands each awake device what its neighbours pushed to it when they last
   finished (records ``d2d.from.<j>``), and the protocol's constants;
5. files each finished device's new predictions (``d2d.logits``) for each of
   its neighbours in this round's graph, awake or not, and forgets what that
   device has just consumed.

The relay is the simulation's convenience, not traffic: the grid times the
predictions on the devices' D2D radios (sent once per neighbour, received
once each) and counts them as ``d2d_bytes``, never as ``bytes_up`` /
``bytes_down``, which stay 0. The round ends with the slowest device's
exchange. A push reaches a neighbour at its next task, so a device that was
offline picks up what was sent to it when it returns; its receive leg is
timed then.

Devices keep their own models (any tier, any sensors): :mod:`.device`.
Scores: the mean test accuracy of the devices' own models, as for the other
strategies whose devices keep their models (``accuracy_min`` is the worst),
plus ``disagreement``: over the round's edges, the share of test samples on
which the two neighbours predict different classes.
"""
from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from fedkd.codecs import get_codec
from fedkd.contract import FedkdStrategy, StrategyEnv
from fedkd.strategy_parts import NoClientEvaluation
from fedkd.device_models import model_key, unpack
from .device import FROM, GOSSIP, MESSAGE_TYPE, REPLY, gossip_task, strip_heads
from fedkd.scoring import PanelDevice, PanelModel, own_model
from fedkd.seeding import derive_seed, rng_for
from fedkd.sim.grid import D2D_ROUTE
from .topology import KINDS, Graph, edges, round_graph
from fedkd.training import predict_logits

# Disagreement is scored on at most this many of the round's edges (a seeded sample).
DISAGREEMENT_EDGES = 48


class GossipKD(FedkdStrategy, NoClientEvaluation, Strategy):
    shares_weights = False
    device_tasks = {MESSAGE_TYPE: gossip_task}

    def __init__(self, topology: str = "ring", degree: int = 4, radio_range: float = 0.3,
                 public_batch: int = 128, codec: str = "fp32", temperature: float = 1.0,
                 distill_weight: float = 0.25, aux_heads: bool = False, local_epochs: int | None = None,
                 learning_rate: float | None = None, min_available_nodes: int = 2, fraction_train: float = 1.0):
        if not 0 < fraction_train <= 1:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if topology not in KINDS:
            raise ValueError(f"topology must be one of {', '.join(KINDS)}, got {topology!r}")
        if degree < 1:
            raise ValueError(f"degree must be positive, got {degree}")
        if radio_range <= 0:
            raise ValueError(f"radio_range must be positive, got {radio_range}")
        if public_batch < 1:
            raise ValueError(f"public_batch must be positive, got {public_batch}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be 0 or more, got {distill_weight}")
        get_codec(codec)  # fail now on a bad codec name
        self.topology, self.degree, self.radio_range = topology, degree, radio_range
        self.min_available_nodes, self.fraction_train = min_available_nodes, fraction_train
        protocol = {"public-batch": public_batch, "codec": codec, "temperature": float(temperature),
                    "distill-weight": float(distill_weight), "aux-heads": bool(aux_heads)}
        if local_epochs is not None:
            protocol["local-epochs"] = int(local_epochs)
        if learning_rate is not None:
            protocol["learning-rate"] = float(learning_rate)
        self.protocol = ConfigRecord(protocol)
        self.population_size: int | None = None
        self.seed = 0
        self.graph: Graph = {}  # this round's
        self.inbox: dict[int, dict[int, ConfigRecord]] = {}  # receiver -> sender -> its last push
        self._round = 0

    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Before round 1: the population's size and the run's seed, for the graphs."""
        super().fedkd_setup(env)
        self.population_size, self.seed = env.ctx.population.size, env.ctx.scenario.seed

    def fedkd_state(self) -> dict:
        """What later rounds depend on, for checkpoints: the predictions waiting for each device."""
        return {"inbox": self.inbox}

    def fedkd_restore(self, state: dict) -> None:
        self.inbox = {int(k): {int(s): r for s, r in mail.items()} for k, mail in state["inbox"].items()}

    # -- Flower's Strategy API ----------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> GossipKD: %s graph, public batch %d, codec %s, no aggregator", self.topology,
            self.protocol["public-batch"], self.protocol["codec"])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.population_size is None:
            raise RuntimeError("GossipKD needs fedkd_setup() before round 1")
        self._round = server_round
        _, online = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        self.graph = round_graph(self.topology, self.population_size, online, seed=self.seed,
                                 server_round=server_round, degree=self.degree, radio_range=self.radio_range)
        awake = self._awake(server_round)
        messages = []
        for device, neighbours in self.graph.items():
            if awake is not None and device not in awake:
                continue  # asleep this round: what its neighbours push waits for it
            content = {GOSSIP: self.protocol, D2D_ROUTE: ConfigRecord({"fanout": len(neighbours)})}
            for sender, pushed in sorted(self.inbox.get(device, {}).items()):
                content[f"{FROM}{sender}"] = pushed
            messages.append(Message(RecordDict(content), device, MESSAGE_TYPE))
        return messages

    def _awake(self, server_round: int) -> set[int] | None:
        """This round's ``fraction_train`` of the graph's devices (Flower's count: the share
        rounded down, at least ``min_available_nodes``), drawn from (seed, round); None: all."""
        if self.fraction_train >= 1:
            return None
        devices = sorted(self.graph)
        count = min(len(devices), max(int(len(devices) * self.fraction_train), self.min_available_nodes))
        chosen = rng_for(self.seed, "gossip-awake", server_round).choice(len(devices), count, replace=False)
        return {devices[i] for i in chosen}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        done = [r for r in replies if not r.has_error()]
        for reply in done:  # what a device received, it has digested
            self.inbox.pop(reply.metadata.src_node_id, None)
        for reply in done:
            sender = reply.metadata.src_node_id
            for neighbour in self.graph[sender]:
                self.inbox.setdefault(neighbour, {})[sender] = reply.content[REPLY]
        return None, MetricRecord({"devices": len(done), "failed": len(replies) - len(done)})

    # -- fedkd's scoring hook ---------------------------------------------------------
    def fedkd_panel_model(self, ctx, device: PanelDevice, device_state: dict) -> PanelModel:
        """A device runs its own model, without the neighbours' heads it trains beside it."""
        return own_model(ctx, device, device_state, strip=strip_heads)

    def fedkd_round_metrics(self, ctx, device_state: dict) -> dict[str, float]:
        """The devices' disagreement across edges (the recorder counts the D2D traffic)."""
        from fedkd.sim.state_store import mapped_view

        # Read on demand: only the devices of the (at most DISAGREEMENT_EDGES) sampled edges,
        # never every stored state (a million devices may hold one).
        models = mapped_view(device_state, strip_heads)
        metrics: dict[str, float] = {}
        pairs = edges(self.graph)
        if pairs:
            metrics["disagreement"] = self._disagreement(ctx, models, pairs)
            metrics["graph_edges"] = float(len(pairs))
        return metrics

    def _disagreement(self, ctx, models: dict[int, ArrayRecord], pairs: list[tuple[int, int]]) -> float:
        if len(pairs) > DISAGREEMENT_EDGES:
            rng = rng_for(self.seed, "disagreement", self._round)
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), DISAGREEMENT_EDGES, replace=False))]
        test = ctx.test_split

        def predictions(device: int) -> np.ndarray:
            tier = ctx.population.class_of(device).model_tier or ctx.scenario.training.model_tier
            modalities = ctx.modalities_of(device)
            key = model_key(tier, modalities)
            model = ctx.new_model(tier, seed=derive_seed(ctx.scenario.seed, "device-model", device, key),
                                  modalities=modalities)
            weights = unpack(models.get(device), key)
            if weights is not None:
                model.load_state_dict(weights)
            return predict_logits(model, test, modalities).argmax(1).numpy()

        return disagreement({d: predictions(d) for d in sorted({d for pair in pairs for d in pair})}, pairs)


def disagreement(predicted: dict[int, np.ndarray], pairs: list[tuple[int, int]]) -> float:
    """Mean over ``pairs`` of the share of samples on which the two devices' predicted classes differ."""
    return float(np.mean([(predicted[a] != predicted[b]).mean() for a, b in pairs]))
