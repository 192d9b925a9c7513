"""DS-FL: distillation-based semi-supervised FL with entropy-reduction aggregation.

Itahara et al., "Distillation-Based Semi-Supervised Federated Learning for
Communication-Efficient Collaborative Training With Non-IID Private Data",
IEEE Transactions on Mobile Computing 2021, https://arxiv.org/abs/2008.06180.

Devices share soft labels on unlabeled open data; the server averages them
and sharpens the average (entropy reduction aggregation, ERA, temperature
T < 1) before sending it back as the distillation target.

DS-FL reads no labels beyond the devices' own: its open data is unlabelled,
so public pretraining is off by default (``public_pretrain_epochs: 0``) and
``fedkd_labels_read`` reports nothing unless a scenario switches it on.
"""
import numpy as np

from fedkd.distill import entropy_reduction
from fedkd.logit_exchange import LogitExchange

SHARES_WEIGHTS = False


class DSFL(LogitExchange):
    def __init__(self, era_temperature: float = 0.1, **kwargs):
        if era_temperature <= 0:
            raise ValueError(f"era_temperature must be positive, got {era_temperature}")
        super().__init__(**kwargs)
        self.era_temperature = era_temperature

    def combine(self, logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return entropy_reduction(logits, weights, self.era_temperature)
