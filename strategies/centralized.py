"""Centralized: the pooled-data upper bound, one model per architecture trained on the whole train split.

Not a federated method and no paper of its own: the upper bound that
federated results are read against (what the same architectures reach when
all data sit in one place). It sends no message to any device. After each
round's (empty) training phase it trains, on the server, one model per
architecture present in the population (model tier and sensors, as in
:mod:`fedkd.architectures`) for ``local_epochs`` epochs (the
scenario's by default) over the *whole* train split, each model fed the
sensors of its architecture. The whole split, not the union of the devices'
shards: lazily dealt shards may overlap and need not cover it, and the
reference is what the data could give. Adam (or the scenario's optimizer)
starts fresh each round, as on devices.

Its ``sim_time_s``, bytes and energy stay 0: the reference is about accuracy
only, and the plots draw it as a dashed horizontal line at its final
accuracy. Scoring is as FedDF's: per architecture on the test split, the
headline weighted by how many devices run each architecture.
"""
from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedkd.architectures import ArchitectureModels
from fedkd.threads import single_threaded
from fedkd.strategy_parts import NoClientEvaluation
from fedkd.seeding import derive_seed
from fedkd.training import train_local



class Centralized(ArchitectureModels, NoClientEvaluation, Strategy):
    def __init__(self, local_epochs: int | None = None, learning_rate: float | None = None):
        if local_epochs is not None and local_epochs < 1:
            raise ValueError(f"local_epochs must be positive, got {local_epochs}")
        self.local_epochs, self.learning_rate = local_epochs, learning_rate
        self.ctx = None
        self.models = {}  # Architecture -> its model (torch)
        self.devices = {}  # Architecture -> devices of the population that run it

    def summary(self) -> None:
        log(INFO, "\t├──> Centralized: %d architectures on the pooled train split", len(self.models))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.ctx is None:
            raise RuntimeError("Centralized needs fedkd_setup() with the server's context before round 1")
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        training = self.ctx.scenario.training
        train = self.ctx.dataset.split("train")
        epochs = self.local_epochs or training.local_epochs
        with single_threaded():
            losses = [train_local(model, train, arch.modalities, epochs=epochs, batch_size=training.batch_size,
                                  learning_rate=self.learning_rate or training.learning_rate,
                                  seed=derive_seed(self.ctx.scenario.seed, "centralized", server_round, arch.key),
                                  optimizer=training.optimizer).mean_loss
                      for arch, model in sorted(self.models.items())]
        return None, MetricRecord({"train-loss": float(np.mean(losses)), "num-examples": len(train)})
