"""FedMD: devices with their own models agree on a consensus of logits over a public set.

Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation",
NeurIPS 2019 Workshop, https://arxiv.org/abs/1910.03581.

Each round: communicate (devices predict public samples), aggregate (the
consensus is the mean of their logits), digest (devices fit the consensus),
revisit (devices train on their private data). fedkd pipelines the loop:
a device digests the previous round's consensus before revisiting and
predicting. The consensus is sent as probabilities at temperature T.

Before collaborating, every model in the paper first learns the labelled
public set ("transfer learning"), then its private data. fedkd does this on
by default: a device whose model is new trains it for
``public_pretrain_epochs`` (default 1) epochs on the first
``public_pretrain_samples`` (default 512) samples of the public split before
its first round (the client does it, ``fedkd.runtime.client.handle_logits``,
and the FLOPs count against the device's time and battery). One pass over
512 samples is about four times a round of local training on a 64-sample
shard for 2 epochs; on ``parking_cams``' sensor motes (small tier) it is
512 x 291,200 FLOPs = 1.5e8 FLOPs, 3 s at 5e7 FLOP/s and 0.75 J at 5 nJ/FLOP,
well inside the 30 s deadline. The paper trains to convergence on the whole
public set; fedkd bounds the cost because every device pays it once, on its
own hardware. ``public_pretrain_epochs: 0`` switches the step off.
``fedkd_labels_read`` reports the samples (``{"transfer": ...}``).
"""
import numpy as np

from fedkd.distill import mean_logits, softmax
from fedkd.logit_exchange import LogitExchange

SHARES_WEIGHTS = False


class FedMD(LogitExchange):
    def __init__(self, public_pretrain_epochs: int = 1, public_pretrain_samples: int | None = 512, **kwargs):
        super().__init__(public_pretrain_epochs=public_pretrain_epochs,
                         public_pretrain_samples=public_pretrain_samples, **kwargs)

    def combine(self, logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
        # FedMD averages logits unweighted ("the consensus"); pass equal weights.
        return softmax(mean_logits(logits, np.ones(len(logits))), self.temperature)
