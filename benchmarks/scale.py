"""How per-round cost, memory and checkpoints grow with the population.

usage: python benchmarks/scale.py --devices N --per-round K --rounds R [--strategy NAME] [--scenario FILE]
                                  [--state-cache-mb M] [--out DIR]

Runs one strategy (``fedavg`` by default; ``fedmd`` and ``gossip_kd`` keep a
model on every device that trains) on the in-process backend over a
population of N devices with K chosen per round (the scenario's data and
device classes; parking_cams by default), checkpointing every round into
``--out`` as ``fedkd simulate`` does, and prints, as its last line, JSON with
``per_round_s`` (mean wall time of a round after the first), ``peak_rss_mb``
(the process's peak resident memory), ``state_devices`` (devices holding
state at the end), ``state_bytes_on_disk`` (their store's files),
``checkpoint_bytes_per_round`` (mean bytes the process wrote per round after
the first, from /proc/self/io ``wchar``: the checkpoint file and the store's
commits) and ``checkpoint_file_bytes`` (the last checkpoint file's size).
gossip_kd has no ``fraction_train``: every online device takes part in its rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]


def scale_scenario(path: str, strategy: str, rounds: int, per_round: int, devices: int, cache_mb: float | None):
    """``path``'s data, world and device classes; ``strategy`` alone, ``per_round`` devices a round."""
    from fedavg_scenario import fedavg_scenario
    from fedkd.scenario import parse_scenario

    raw = fedavg_scenario(path, rounds, per_round, devices=devices).model_dump(mode="json")
    if strategy == "fedmd":
        raw["strategies"] = [{"name": "fedmd", "params": {
            "fraction_train": per_round / devices, "min_train_nodes": per_round, "min_available_nodes": per_round}}]
    elif strategy == "gossip_kd":
        raw["strategies"] = [{"name": "gossip_kd", "params": {"min_available_nodes": 2}}]
    elif strategy != "fedavg":
        raise SystemExit(f"--strategy {strategy}: expected fedavg, fedmd or gossip_kd")
    if cache_mb is not None:
        raw["backend"]["state_cache_mb"] = cache_mb
    return parse_scenario(raw, "benchmark")


def written_bytes() -> int:
    """Bytes this process has passed to write calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--strategy", default="fedavg", help="fedavg, fedmd or gossip_kd")
    parser.add_argument("--scenario", default=str(REPO / "scenarios" / "parking_cams.yaml"))
    parser.add_argument("--state-cache-mb", type=float, default=None, help="backend.state_cache_mb (default: its own)")
    parser.add_argument("--out", default=None, help="results folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()

    from fedkd.checkpoint import CheckpointStore
    from fedkd.runner import run_scenario
    from fedkd.sim.state_store import DeviceStateStore

    scenario = scale_scenario(args.scenario, args.strategy, args.rounds, args.per_round, args.devices,
                              args.state_cache_mb)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fedkd-scale-"))
    checkpoints = CheckpointStore(out, scenario, keep_state=True)  # kept to be measured, removed below
    checkpoints.clear()
    label = scenario.strategies[0].run_label
    round_ends: list[float] = []
    writes: list[int] = []

    def progress(label_, record, total) -> None:
        round_ends.append(time.perf_counter())
        writes.append(written_bytes())

    started = time.perf_counter()
    [run] = run_scenario(scenario, progress=progress, checkpoints=checkpoints)
    total_s = time.perf_counter() - started
    gaps = [b - a for a, b in zip(round_ends[1:], round_ends[2:])] or [total_s]
    per_round_writes = [b - a for a, b in zip(writes[1:], writes[2:])] or [0]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checkpoint_file = checkpoints.path(0, label)
    state_path = checkpoints.state_path(0, label)
    state_devices, state_disk = 0, 0
    if state_path.exists():
        store = DeviceStateStore(state_path, identity=checkpoints.state_identity(label), resume=True)
        state_devices, state_disk = len(store), store.bytes_on_disk()
        store.close()
    checkpoint_file_bytes = checkpoint_file.stat().st_size if checkpoint_file.exists() else 0
    checkpoints.clear()
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)
    print(f"{args.strategy}: {args.devices:,} devices, {args.per_round} per round, {args.rounds} rounds: "
          f"accuracy {run.rounds[-1].accuracy:.3f}", file=sys.stderr)
    print(json.dumps({"strategy": args.strategy, "devices": args.devices, "per_round": args.per_round,
                      "rounds": args.rounds, "per_round_s": round(sum(gaps) / len(gaps), 4),
                      "total_s": round(total_s, 2), "participants_last_round": run.rounds[-1].participants,
                      "peak_rss_mb": round(peak_kb / 1024, 1), "state_devices": state_devices,
                      "state_bytes_on_disk": state_disk,
                      "checkpoint_bytes_per_round": round(sum(per_round_writes) / len(per_round_writes)),
                      "checkpoint_bytes_last_round": per_round_writes[-1],
                      "checkpoint_file_bytes": checkpoint_file_bytes}))


if __name__ == "__main__":
    main()
