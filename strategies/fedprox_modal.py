"""FedProx, modality-wise: FedProx's proximal term, each device moving only its own sensors' encoders and the head.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127, with the modality-wise aggregation of
Ouyang et al., "Harmony: Heterogeneous Multi-Modal Federated Learning through
Disentangled Model Training", ACM MobiSys 2023,
https://doi.org/10.1145/3581791.3596844; averaging as in FedAvg (McMahan et
al. 2017, https://arxiv.org/abs/1602.05629).

:class:`fedkd.strategies.fedavg_modal.FedAvgModal` on top of Flower's own
``FedProx``: Flower's ``FedProx.configure_train`` puts ``proximal-mu`` in the
train config, then the per-device slicing and the per-parameter aggregation of
``fedavg_modal`` apply. fedkd's client adds (mu / 2) * ||w - w_global||^2 over
the parameters it was sent (``fedkd.training.train_local``), so the term pulls
only the device's own encoders and the head towards the global model.
"""
from flwr.serverapp.strategy import FedProx

from fedkd.strategies.fedavg_modal import FedAvgModal

SHARES_WEIGHTS = True  # one shared multimodal model; the server keeps every encoder


class FedProxModal(FedAvgModal, FedProx):
    """FedProx, modality-wise: FedProx's proximal term with fedavg_modal's per-sensor download and averaging."""


__all__ = ["FedProxModal", "SHARES_WEIGHTS"]
