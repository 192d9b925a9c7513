"""How per-round cost and memory grow with the population.

usage: python benchmarks/scale.py --devices N --per-round K --rounds R [--scenario FILE]

Runs FedAvg on the in-process backend over a population of N devices with K
chosen per round (the scenario's data and device classes; parking_cams by
default), and prints, as its last line, JSON with ``per_round_s`` (mean wall
time of a round after the first) and ``peak_rss_mb`` (the process's peak
resident memory).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenario", default=str(REPO / "scenarios" / "parking_cams.yaml"))
    args = parser.parse_args()

    from fedavg_scenario import fedavg_scenario
    from fedkd.runner import run_scenario

    scenario = fedavg_scenario(args.scenario, args.rounds, args.per_round, devices=args.devices)

    round_ends: list[float] = []
    started = time.perf_counter()
    [run] = run_scenario(scenario, progress=lambda label, record, total: round_ends.append(time.perf_counter()))
    total_s = time.perf_counter() - started
    gaps = [b - a for a, b in zip(round_ends[1:], round_ends[2:])] or [total_s]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{args.devices:,} devices, {args.per_round} per round, {args.rounds} rounds: "
          f"accuracy {run.rounds[-1].accuracy:.3f}", file=sys.stderr)
    print(json.dumps({"devices": args.devices, "per_round": args.per_round, "rounds": args.rounds,
                      "per_round_s": round(sum(gaps) / len(gaps), 4), "total_s": round(total_s, 2),
                      "participants_last_round": run.rounds[-1].participants,
                      "peak_rss_mb": round(peak_kb / 1024, 1)}))


if __name__ == "__main__":
    main()
