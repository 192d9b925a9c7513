"""Small pieces several fedkd strategies share, so each strategy file keeps
only what makes it different."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes


class NoClientEvaluation:
    """For strategies that fedkd scores on the server: no federated evaluation round.

    Put it before the Flower base class, so its methods fill Strategy's abstract ones.
    """

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def weighted_reply_metrics(valid: Sequence[Message], loss_key: str) -> MetricRecord:
    """The replies' ``loss_key`` averaged by their ``num-examples``, and the examples' total."""
    weights = np.array([float(r.content["metrics"]["num-examples"]) for r in valid])
    losses = np.array([float(r.content["metrics"][loss_key]) for r in valid])
    return MetricRecord({loss_key: float(np.average(losses, weights=weights)), "num-examples": float(weights.sum())})


def check_sampling(fraction_train: float, min_train_nodes: int, min_available_nodes: int) -> None:
    """ValueError (one line) for sampling settings FedAvg's rule cannot use."""
    if not 0 < fraction_train <= 1:
        raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
    if min_train_nodes < 1 or min_available_nodes < 1:
        raise ValueError(f"min_train_nodes and min_available_nodes must be >= 1, "
                         f"got {min_train_nodes} and {min_available_nodes}")


def sample_devices(grid: Grid, fraction_train: float, min_train_nodes: int, min_available_nodes: int) -> list[int]:
    """This round's devices as Flower's FedAvg samples them: ``fraction_train`` of those online,
    at least ``min_train_nodes``, waiting for ``min_available_nodes`` (Flower's own sample_nodes)."""
    sample_size = max(int(len(list(grid.get_node_ids())) * fraction_train), min_train_nodes)
    node_ids, _ = sample_nodes(grid, min_available_nodes, sample_size)
    return list(node_ids)
