"""FedProx: FedAvg with a proximal term that keeps local models near the global one.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127.

Flower's own ``flwr.serverapp.strategy.FedProx``, unmodified. It sends
``proximal-mu`` in the train config; fedkd's client adds
(mu / 2) * ||w - w_global||^2 to its loss (``fedkd.training.train_local``).
"""
from flwr.serverapp.strategy import FedProx

SHARES_WEIGHTS = True

__all__ = ["FedProx", "SHARES_WEIGHTS"]
