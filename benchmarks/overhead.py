"""What fedkd's machinery costs on top of the learning it simulates.

usage: python benchmarks/overhead.py [--rounds R] [--per-round K] [--scenario FILE]

Runs FedAvg for R rounds on the in-process backend, then repeats the same
work in a bare torch loop: the same devices, the same shards, the same
``train_local`` calls with the same seeds, weighted averaging, and the same
test evaluation, without Flower messages, the simulated grid, SimPy or the
report. Prints, as its last line, JSON with ``overhead_ratio`` = fedkd's wall
time / the bare loop's, measured in one process, one after the other.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]


def bare_loop(scenario, chosen_by_round: dict[int, list[int]]) -> float:
    import numpy as np
    import torch

    from fedkd.context import simulation_context
    from fedkd.scoring import evaluation_panel, global_model, score_panel
    from fedkd.seeding import derive_seed
    from fedkd.training import train_local

    ctx = simulation_context(scenario)
    panel = evaluation_panel(ctx, scenario.evaluation.panel_devices)

    def evaluate_global(state) -> None:  # the same scoring a FedAvg run pays
        shared = global_model(ctx, state)
        score_panel(ctx, panel, lambda device: shared)

    training = scenario.training
    started = time.perf_counter()
    torch.set_num_threads(1)
    global_state = ctx.new_model(training.model_tier).state_dict()
    evaluate_global(global_state)
    for server_round in sorted(chosen_by_round):
        states, weights = [], []
        for device_id in chosen_by_round[server_round]:
            device = ctx.device(device_id)
            model = ctx.new_model(device.model_tier)
            model.load_state_dict(global_state)
            outcome = train_local(model, device.data, device.modalities, epochs=training.local_epochs,
                                  batch_size=training.batch_size, learning_rate=training.learning_rate,
                                  seed=derive_seed(scenario.seed, "train", server_round, device_id),
                                  optimizer=training.optimizer)
            states.append(model.state_dict())
            weights.append(outcome.num_examples)
        if states:
            w = np.array(weights, dtype=np.float64) / sum(weights)
            global_state = {k: sum(float(wi) * s[k] for wi, s in zip(w, states)) for k in states[0]}
        evaluate_global(global_state)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=30)
    parser.add_argument("--scenario", default=str(REPO / "scenarios" / "parking_cams.yaml"))
    args = parser.parse_args()

    from fedavg_scenario import fedavg_scenario
    from fedkd.runner import run_scenario
    from fedkd.context import simulation_context

    scenario = fedavg_scenario(args.scenario, args.rounds, args.per_round)
    ctx = simulation_context(scenario)
    ctx.dataset.split("train"), ctx.test_split, ctx.partitioner  # warm caches for both sides alike
    import torch

    # torch imports its compiler stack lazily on the first optimizer (about 1 s): pay it before timing.
    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())

    started = time.perf_counter()
    [run] = run_scenario(scenario)
    fedkd_s = time.perf_counter() - started
    # The bare loop trains exactly the devices fedkd executed (failed ones ran too).
    executed: dict[int, list[int]] = {r: [] for r in range(1, args.rounds + 1)}
    for d in run.devices:
        if d.reason not in ("offline", "battery") or d.energy_j > 0:
            executed[d.round].append(d.device_id)
    bare_s = bare_loop(scenario, executed)
    print(json.dumps({"rounds": args.rounds, "per_round": args.per_round, "fedkd_s": round(fedkd_s, 3),
                      "bare_s": round(bare_s, 3), "overhead_ratio": round(fedkd_s / bare_s, 3)}))


if __name__ == "__main__":
    main()
