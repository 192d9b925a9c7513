"""Per-strategy figures of a finished run over its seeds, against the better weight-sharing baseline.

usage: python benchmarks/strategy_table.py RESULTS_DIR [MORE_DIR...]

Reads rounds.csv and summary.json of each folder (written by `fedkd simulate`,
one seed or several; strategies of later folders are added to the first's,
e.g. variants run on their own) and prints one markdown row per strategy, each figure
as mean ± half-width of its 95 % t interval over seeds:

- final accuracy;
- device bytes (up + down) per participant-round, and total bytes of the run
  (device links + fog backhaul + device-to-device), each as a ratio of the
  baseline's;
- simulated time and device energy to first reach the target (the baseline's
  mean final accuracy), in how many seeds it was reached, and as fractions of
  the baseline's whole run (seed by seed, then averaged).

The baseline is the *better* weight-sharing strategy: of the run's strategies
that exchange weights (the registry's ``shares_weights``), the one with the
highest mean final accuracy. The last line is the same as JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fedkd.registry import resolve_strategy
from fedkd.stats import summarize_values


def per_seed(rounds: pd.DataFrame) -> pd.DataFrame:
    """One row per (strategy, seed): final accuracy, whole-run time, energy and bytes."""
    rounds = rounds.copy()
    if "seed" not in rounds.columns:
        rounds["seed"] = 0
    if "total_bytes" not in rounds.columns:  # a folder written before total_bytes existed
        rounds["total_bytes"] = rounds["bytes_up"] + rounds["bytes_down"]
    rows = []
    for (label, seed), group in rounds.groupby(["strategy", "seed"], sort=False):
        group = group.sort_values("round")
        trained = group[group["round"] > 0]
        device_bytes = int((trained["bytes_up"] + trained["bytes_down"]).sum())
        rows.append({"strategy": label, "seed": int(seed), "final_accuracy": float(group["accuracy"].iloc[-1]),
                     "sim_time_s": float(group["sim_time_s"].iloc[-1]), "energy_j": float(group["energy_j"].sum()),
                     "total_bytes": float(group["total_bytes"].sum()),
                     "bytes_per_participant_round": device_bytes / max(int(trained["participants"].sum()), 1),
                     "curve": group[["accuracy", "sim_time_s", "energy_j"]].to_numpy()})
    return pd.DataFrame(rows)


def first_reaching(curve: np.ndarray, target: float) -> tuple[float | None, float | None]:
    """(simulated time, cumulative device energy) of the first round at or above ``target``."""
    energy = np.cumsum(curve[:, 2])
    hit = np.flatnonzero(curve[:, 0] >= target)
    return (None, None) if not len(hit) else (float(curve[hit[0], 1]), float(energy[hit[0]]))


def fmt(summary: dict, scale: float = 1.0, digits: int = 3) -> str:
    if summary["mean"] is None:
        return "not reached"
    text = f"{summary['mean'] * scale:.{digits}g}"
    if summary["ci95"] is not None:
        text += f" ± {(summary['ci95'][1] - summary['mean']) * scale:.2g}"
    return text


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    folders = [Path(arg) for arg in sys.argv[1:]]
    # A label a folder repeats is taken from the first folder that has it.
    runs = pd.concat([per_seed(pd.read_csv(out / "rounds.csv")) for out in folders], ignore_index=True)
    runs = runs.drop_duplicates(["strategy", "seed"], keep="first")
    summaries: dict[str, dict] = {}
    for out in folders:
        for label, s in json.loads((out / "summary.json").read_text())["strategies"].items():
            summaries.setdefault(label, s)
    names = {label: s["strategy"] for label, s in summaries.items()}
    sharing = [label for label in names if resolve_strategy(names[label]).shares_weights]
    means = runs.groupby("strategy")["final_accuracy"].mean()
    baseline = max(sharing, key=lambda label: means[label])
    target = float(means[baseline])
    base = runs[runs["strategy"] == baseline].set_index("seed")
    table = {}
    for label in names:
        mine = runs[runs["strategy"] == label].set_index("seed")
        reach = {seed: first_reaching(row["curve"], target) for seed, row in mine.iterrows()}
        row = {
            "final_accuracy": summarize_values(mine["final_accuracy"].tolist()),
            "bytes_per_participant_round": summarize_values(mine["bytes_per_participant_round"].tolist()),
            "device_bytes_vs_baseline": summarize_values(
                (mine["bytes_per_participant_round"] / base["bytes_per_participant_round"]).dropna().tolist()),
            "total_bytes_vs_baseline": summarize_values((mine["total_bytes"] / base["total_bytes"]).dropna().tolist()),
            "time_to_target_s": summarize_values([t for t, _ in reach.values()]),
            "energy_to_target_j": summarize_values([e for _, e in reach.values()]),
            "time_fraction_of_baseline_run": summarize_values(
                [t / base.loc[s, "sim_time_s"] if t is not None and s in base.index else None
                 for s, (t, _) in reach.items()]),
            "energy_fraction_of_baseline_run": summarize_values(
                [e / base.loc[s, "energy_j"] if e is not None and s in base.index else None
                 for s, (_, e) in reach.items()]),
            "reached": f"{sum(t is not None for t, _ in reach.values())}/{len(reach)}",
            "labelled_public": summaries[label].get("labelled_public", {}).get("total"),
        }
        table[label] = row
    seeds = sorted(runs["seed"].unique().tolist())
    print(f"seeds {seeds}; baseline (better weight-sharing): {baseline}, target accuracy {target:.4f}\n")
    print("| strategy | final accuracy | device bytes / participant-round (x baseline) | total bytes (x baseline) "
          "| reached | time to target s (fraction of baseline run) | energy to target J (fraction) | labels read |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, row in table.items():
        print(f"| {label} | {fmt(row['final_accuracy'])} | {fmt(row['bytes_per_participant_round'], digits=5)} "
              f"({fmt(row['device_bytes_vs_baseline'], digits=2)}) | {fmt(row['total_bytes_vs_baseline'], digits=2)} "
              f"| {row['reached']} | {fmt(row['time_to_target_s'])} ({fmt(row['time_fraction_of_baseline_run'], digits=2)}) "
              f"| {fmt(row['energy_to_target_j'])} ({fmt(row['energy_fraction_of_baseline_run'], digits=2)}) "
              f"| {row['labelled_public']} |")
    print(json.dumps({"baseline": baseline, "target_accuracy": target, "seeds": seeds, "strategies": table}))


if __name__ == "__main__":
    main()
