"""FedAvg: average the devices' weights, weighted by their sample counts.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, https://arxiv.org/abs/1602.05629.

This is Flower's own ``flwr.serverapp.strategy.FedAvg``, unmodified: the
baseline that every fedkd strategy is compared with. On multimodal shards the
devices train one shared multimodal model (one encoder per modality, a missing
modality masked), so all devices must share one architecture.
"""
from flwr.serverapp.strategy import FedAvg

SHARES_WEIGHTS = True  # devices exchange model weights: one architecture for all

__all__ = ["FedAvg", "SHARES_WEIGHTS"]
