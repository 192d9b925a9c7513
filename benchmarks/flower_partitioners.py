"""What a Flower Datasets partitioner costs as the population grows, next to fedkd's lazy one.

Each configuration runs in a fresh process (so peak memory is its own): a train
split of ``--samples`` labels (10 classes) is dealt to N devices through
fedkd's wrappers (fedkd.data.dealing.make_partitioner), and we time

- ``first_shard_s``: building the partitioner and dealing device 0 (a Flower
  partitioner materialises every partition here),
- ``next_shard_ms``: each of the next 100 devices' shards, on average,

and the process's peak resident memory above what it held before building.

    .venv/bin/python benchmarks/flower_partitioners.py                 # 10^3, 10^4, 10^5 devices
    .venv/bin/python benchmarks/flower_partitioners.py --devices 1000  # one size
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    "fedkd lazy": {},
    "IidPartitioner": {"partitioner": "IidPartitioner"},
    "DirichletPartitioner": {"partitioner": "DirichletPartitioner",
                             "params": {"alpha": 0.5, "min_partition_size": 0}},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(name: str, devices: int, samples: int) -> dict:
    from fedkd.data.dealing import make_partitioner
    from fedkd.scenario import PartitionSpec

    labels = np.random.default_rng(0).integers(0, 10, size=samples)
    spec = PartitionSpec(**CONFIGS[name])
    if spec.partitioner:
        import datasets  # noqa: F401 - imported before the baseline, so its own size is not counted
        import flwr_datasets.partitioner  # noqa: F401
    before = peak_rss_mb()
    start = time.perf_counter()
    dealt = make_partitioner(spec, labels, None, 10, seed=0, num_devices=devices)
    first = dealt.shard(0)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    others = [dealt.shard(i) for i in range(1, 101)]
    next_ms = (time.perf_counter() - start) / len(others) * 1000
    return {"partitioner": name, "devices": devices, "samples": samples, "first_shard_s": round(first_s, 3),
            "next_shard_ms": round(next_ms, 2), "peak_rss_above_start_mb": round(peak_rss_mb() - before, 1),
            "shard_0_size": len(first.indices)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.devices[0], args.samples)))
        return
    print(f"{'partitioner':<22}{'devices':>9}{'first shard s':>15}{'next shard ms':>15}{'peak MB':>9}")
    for devices in args.devices:
        for name in CONFIGS:
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--devices", str(devices),
                                   "--samples", str(args.samples)], capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                print(f"{name:<22}{devices:>9,}  failed: {proc.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name:<22}{devices:>9,}{r['first_shard_s']:>15.3f}{r['next_shard_ms']:>15.2f}"
                  f"{r['peak_rss_above_start_mb']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
