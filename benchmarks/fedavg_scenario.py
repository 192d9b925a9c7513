"""The scenario both benchmarks time: FedAvg alone, K devices asked a round."""
from __future__ import annotations

import logging


def fedavg_scenario(path: str, rounds: int, per_round: int, devices: int | None = None):
    """``path``'s data, world and device classes; FedAvg only, ``per_round`` devices a round."""
    import flwr.supercore.logger  # noqa: F401 - Flower sets its log level on import; quiet it after
    from fedkd.scenario import parse_scenario
    from fedkd.checks import load_scenario

    logging.getLogger("flwr").setLevel(logging.ERROR)
    raw = load_scenario(path).model_dump(mode="json")
    if devices is not None:
        raw["population"]["devices"] = devices
    raw["rounds"] = rounds
    raw["strategy_defaults"] = {}
    raw["strategies"] = [{"name": "fedavg", "params": {
        "fraction_train": per_round / raw["population"]["devices"], "fraction_evaluate": 0.0,
        "min_train_nodes": per_round, "min_available_nodes": per_round}}]
    return parse_scenario(raw, "benchmark")
