"""FedAvg with a server learning rate: the global model moves part of the way to the average.

Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019, https://arxiv.org/abs/1909.06335
(FedAvgM; this is its server step without momentum).
"""
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

SHARES_WEIGHTS = True  # devices exchange model weights, so all need one architecture


class ServerStepFedAvg(FedAvg):
    """FedAvg whose global model moves server_lr of the way to the devices' average."""

    def __init__(self, server_lr: float = 0.5, **fedavg_args):
        super().__init__(**fedavg_args)
        self.server_lr = server_lr

    def configure_train(self, server_round, arrays, config, grid):
        self.global_arrays = arrays  # aggregate_train is not shown the global model: keep it
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None:  # no device replied in time: keep the global model
            return None, metrics
        lr, old = self.server_lr, self.global_arrays
        # Written as a blend so that server_lr = 1 is FedAvg to the bit and 0 never moves.
        stepped = {k: Array((1 - lr) * old[k].numpy() + lr * average[k].numpy()) for k in average}
        return ArrayRecord(stepped), metrics
