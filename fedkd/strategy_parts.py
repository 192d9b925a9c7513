"""Small pieces several fedkd strategies share, so each strategy file keeps
only what makes it different."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid


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
