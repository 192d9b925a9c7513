"""fedkd's device tasks per second against a bare torch loop and the machine's matmul rate.

usage: python benchmarks/throughput.py [--devices N] [--per-round K] [--rounds R]
                                        [--backend inprocess|processes] [--workers W]

Runs FedAvg on ``parking_cams``' data and device classes (K devices asked a
round, N in the population) on the chosen backend, then trains the very same
device tasks (the same devices, shards, seeds and ``train_local`` calls) one
after another in a bare loop in this process, then times a 2048x2048 float32
matmul with all the cores torch may use. Round 1 is a warm-up (workers start,
load the data); the figures are for rounds 2..R. Prints, as its last line,
JSON with:

- ``fedkd_tasks_per_s``: device training tasks fedkd ran / wall time of rounds
  2..R (a fedkd round also samples, runs the world, aggregates, scores the model);
- ``bare_tasks_per_s``: the same tasks / the bare loop's time; ``speedup_vs_bare``
  = fedkd / bare;
- ``fedkd_gflops``, ``bare_gflops``: training FLOPs of those tasks (fedkd's own
  per-sample counts) / those times; ``matmul_gflops``: the machine's rate measured
  here; ``fedkd_share_of_matmul`` = fedkd_gflops / matmul_gflops;
- ``torch_device``, ``workers``, ``cores`` and, for ``processes``, ``startup_s``:
  the time until every worker process answered (imports, the ClientApp; no data).

With ``--batched K`` it instead trains K devices of each modality set one by one
and batched (:mod:`fedkd.batched`) and prints the times per set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """The best of ``repeats`` float32 ``size`` x ``size`` matmuls, with torch's default threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def bare_loop(scenario, tasks: list[tuple[int, int]]) -> float:
    """Seconds to train ``tasks`` ((round, device) pairs) one after another, as fedkd's client does."""
    import torch

    from fedkd.context import simulation_context
    from fedkd.seeding import derive_seed
    from fedkd.training import train_local

    ctx = simulation_context(scenario)
    training = scenario.training
    global_state = ctx.new_model(training.model_tier).state_dict()
    torch.set_num_threads(1)  # as fedkd's client: one thread per task
    started = time.perf_counter()
    for server_round, device_id in tasks:
        device = ctx.device(device_id)
        model = ctx.new_model(device.model_tier)
        model.load_state_dict(global_state)
        train_local(model, device.data, device.modalities, epochs=training.local_epochs,
                    batch_size=training.batch_size, learning_rate=training.learning_rate,
                    seed=derive_seed(scenario.seed, "train", server_round, device_id),
                    optimizer=training.optimizer, self_distillation=training.self_distillation)
    return time.perf_counter() - started


def worker_startup_s(scenario, workers: int) -> float:
    """Seconds until ``workers`` fresh worker processes have each answered one message."""
    import cloudpickle
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedkd.runtime.client import make_client_app
    from fedkd.runtime.processes import WorkerPool

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    started = time.perf_counter()
    pool = WorkerPool(cloudpickle.dumps(make_client_app(scenario)), workers, 40)
    # A message no handler takes: the reply (an error) proves the worker is up, without data.
    probes = [Message(RecordDict({"x": ConfigRecord({})}), 1001, "query.nothing", group_id="0")
              for _ in range(workers)]
    for i, probe in enumerate(probes):
        probe.metadata.__dict__["_message_id"] = f"probe-{i}"
    # One at a time per worker: a busy pool hands each probe to the next idle worker.
    replies = pool.run([[probe] for probe in probes], timeout=None)
    elapsed = time.perf_counter() - started
    pool.close()
    assert all(r.has_error() for [r] in replies)
    return elapsed


def batched_vs_one_by_one(scenario, count: int) -> dict:
    """Seconds to train ``count`` devices of each modality set one by one and batched
    (fedkd.batched), from the same global model, and the largest weight difference."""
    import torch

    from fedkd.batched import train_batched
    from fedkd.context import simulation_context
    from fedkd.seeding import derive_seed
    from fedkd.training import train_local

    ctx = simulation_context(scenario)
    training = scenario.training
    torch.set_num_threads(1)
    start = ctx.new_model(training.model_tier).state_dict()
    groups: dict[tuple[str, ...], list] = {}
    for device_id in range(scenario.population.devices):
        device = ctx.device(device_id)
        if len(groups.setdefault(device.modalities, [])) < count:
            groups[device.modalities].append(device)
    out = {}
    for modalities, devices in sorted(groups.items()):
        seeds = [derive_seed(scenario.seed, "train", 1, d.device_id) for d in devices]
        args = dict(epochs=training.local_epochs, batch_size=training.batch_size,
                    learning_rate=training.learning_rate, optimizer=training.optimizer)
        models = {}
        for way in ("one_by_one", "batched"):
            models[way] = [ctx.new_model(training.model_tier) for _ in devices]
            for m in models[way]:
                m.load_state_dict(start)
        started = time.perf_counter()
        for m, d, seed in zip(models["one_by_one"], devices, seeds):
            train_local(m, d.data, modalities, seed=seed, **args)
        one_s = time.perf_counter() - started
        started = time.perf_counter()
        train_batched(models["batched"], [d.data for d in devices], modalities, seeds=seeds, **args)
        batched_s = time.perf_counter() - started
        diff = max(float((a - b).abs().max()) for ma, mb in zip(models["one_by_one"], models["batched"])
                   for a, b in zip(ma.state_dict().values(), mb.state_dict().values()))
        out["+".join(modalities)] = {"devices": len(devices), "one_by_one_s": round(one_s, 3),
                                     "batched_s": round(batched_s, 3), "speedup": round(one_s / batched_s, 2),
                                     "max_abs_weight_diff": diff}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--backend", choices=["inprocess", "processes"], default="inprocess")
    parser.add_argument("--workers", type=int, default=None, help="processes backend; default: the cores")
    parser.add_argument("--batch-devices", type=int, default=1,
                        help="backend.batch_devices: devices trained as one batch (1: one by one)")
    parser.add_argument("--torch-device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--scenario", default=str(REPO / "scenarios" / "parking_cams.yaml"))
    parser.add_argument("--batched", type=int, metavar="K", default=None,
                        help="instead: time K devices per modality set trained one by one and batched")
    args = parser.parse_args()

    from fedavg_scenario import fedavg_scenario

    from fedkd.runner import run_scenario
    from fedkd.runtime.backends import default_executors
    from fedkd.context import simulation_context
    from fedkd.scenario import parse_scenario

    base = fedavg_scenario(args.scenario, args.rounds, args.per_round, devices=args.devices)
    raw = base.model_dump(mode="json")
    raw["backend"].update(kind=args.backend, workers=args.workers, torch_device=args.torch_device,
                          batch_devices=args.batch_devices)
    scenario = parse_scenario(raw, "benchmark")
    ctx = simulation_context(scenario)
    if args.batched is not None:
        print(json.dumps(batched_vs_one_by_one(scenario, args.batched)))
        return
    workers = (args.workers or default_executors()) if args.backend == "processes" else 1
    startup_s = worker_startup_s(scenario, workers) if args.backend == "processes" else None
    import torch

    torch.optim.Adam(torch.nn.Linear(1, 1).parameters())  # torch's lazy optimizer imports, outside the timing

    round_ends: dict[int, float] = {}  # round -> when it ended (round 0: the initial model's score)
    [run] = run_scenario(scenario, progress=lambda label, record, total: round_ends.setdefault(
        record.round, time.perf_counter()))
    from fedkd.runtime.processes import close_pools

    close_pools()
    measured_s = round_ends[args.rounds] - round_ends[1]
    tasks = [(d.round, d.device_id) for d in run.devices
             if d.phase == "train" and d.round > 1 and d.reason not in ("offline", "battery")]
    flops = 0.0
    for _, device_id in tasks:
        device = ctx.device(device_id)
        flops += (ctx.train_flops_per_sample(device.model_tier, device.modalities) * len(device.data)
                  * scenario.training.local_epochs)
    bare_s = bare_loop(scenario, tasks)
    torch.set_num_threads(default_executors())
    matmul = matmul_gflops()
    fedkd_rate, bare_rate = len(tasks) / measured_s, len(tasks) / bare_s
    print(f"{args.devices:,} devices, {args.per_round} a round, {args.backend} x{workers}, "
          f"{len(tasks)} tasks timed: fedkd {measured_s:.2f} s, bare loop {bare_s:.2f} s", file=sys.stderr)
    print(json.dumps({
        "devices": args.devices, "per_round": args.per_round, "rounds": args.rounds, "backend": args.backend,
        "workers": workers, "batch_devices": args.batch_devices, "cores": default_executors(), "torch_device": str(ctx.torch_device),
        "tasks": len(tasks), "fedkd_s": round(measured_s, 3), "bare_s": round(bare_s, 3),
        "fedkd_tasks_per_s": round(fedkd_rate, 2), "bare_tasks_per_s": round(bare_rate, 2),
        "speedup_vs_bare": round(fedkd_rate / bare_rate, 3),
        "fedkd_gflops": round(flops / measured_s / 1e9, 3), "bare_gflops": round(flops / bare_s / 1e9, 3),
        "matmul_gflops": round(matmul, 1), "fedkd_share_of_matmul": round(flops / measured_s / 1e9 / matmul, 4),
        "startup_s": None if startup_s is None else round(startup_s, 2),
    }))


if __name__ == "__main__":
    main()
