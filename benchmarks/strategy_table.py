"""Per-strategy figures of a finished run, against FedAvg.

usage: python benchmarks/strategy_table.py RESULTS_DIR

Reads RESULTS_DIR/rounds.csv and summary.json (written by `fedkd simulate`)
and prints one row per strategy: final accuracy, bytes per participant-round
(device links, up + down) and how many times fewer than FedAvg, simulated
time and device energy to first reach FedAvg's final accuracy (and their
fractions of FedAvg's), and the gap to `centralized` when it ran. The last
line is the same as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    rounds = pd.read_csv(out / "rounds.csv")
    summary = json.loads((out / "summary.json").read_text())
    trained = rounds[rounds["round"] > 0]
    per = trained.groupby("strategy").agg(bytes=("bytes_up", "sum"), down=("bytes_down", "sum"),
                                          participants=("participants", "sum"))
    per["bytes_per_participant_round"] = (per["bytes"] + per["down"]) / per["participants"].clip(lower=1)
    fedavg = summary["strategies"].get("fedavg")
    central = summary["strategies"].get("centralized")
    table = {}
    for label, s in summary["strategies"].items():
        row = {"final_accuracy": s["final_accuracy"], "sim_time_s": s["sim_time_s"], "energy_j": s["energy_j"],
               "bytes_per_participant_round": float(per.loc[label, "bytes_per_participant_round"])
               if label in per.index and per.loc[label, "participants"] > 0 else None}
        if fedavg and row["bytes_per_participant_round"]:
            base = float(per.loc["fedavg", "bytes_per_participant_round"])
            row["times_fewer_bytes_than_fedavg"] = base / row["bytes_per_participant_round"]
        reach = s.get("to_reference_accuracy") or {}
        row["time_to_fedavg_final_s"] = reach.get("sim_time_s")
        row["energy_to_fedavg_final_j"] = reach.get("cum_energy_j")
        if fedavg and reach.get("sim_time_s") is not None:
            row["time_fraction_of_fedavg"] = reach["sim_time_s"] / fedavg["sim_time_s"]
            row["energy_fraction_of_fedavg"] = reach["cum_energy_j"] / fedavg["energy_j"]
        if central and central["final_accuracy"] is not None and s["final_accuracy"] is not None:
            row["points_below_centralized"] = 100 * (central["final_accuracy"] - s["final_accuracy"])
        table[label] = row
    frame = pd.DataFrame(table).T
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(frame)
    print(json.dumps(table, default=float))


if __name__ == "__main__":
    main()
