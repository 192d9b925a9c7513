"""FedMD: devices with their own models agree on a consensus of logits over a public set.

Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation",
NeurIPS 2019 Workshop, https://arxiv.org/abs/1910.03581.

Each round: communicate (devices predict public samples), aggregate (the
consensus is the mean of their logits), digest (devices fit the consensus),
revisit (devices train on their private data). fedkd pipelines the loop:
a device digests the previous round's consensus before revisiting and
predicting. The consensus is sent as probabilities at temperature T.
"""
import numpy as np

from fedkd.distill import mean_logits, softmax
from fedkd.logit_exchange import LogitExchange

SHARES_WEIGHTS = False


class FedMD(LogitExchange):
    def combine(self, logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # FedMD averages logits unweighted ("the consensus"); pass equal weights.
        return softmax(mean_logits(logits, np.ones(len(logits))), self.temperature)
