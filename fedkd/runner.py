"""``fedkd simulate``: run every strategy of a scenario, then write the results.

``simulate`` checkpoints the run in the results folder after every round and
removes the checkpoint once the results are written; with ``resume=True`` it
continues from that checkpoint (:mod:`fedkd.checkpoint`).
"""
from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import CheckpointStore
from .references import check_references
from .report import versions, write_results
from .results import StrategyRun
from .runtime.backends import run_backend
from .runtime.client import make_client_app
from .runtime.server import ProgressFn, StrategyJob, make_server_app
from .scenario import Scenario, parse_scenario
from .sim.recorder import run_from_state, run_state


def with_overrides(scenario: Scenario, path: str, *, seed: int | None = None, rounds: int | None = None,
                   strategies: list[str] | None = None, backend: str | None = None) -> Scenario:
    """The scenario with command-line overrides applied and validated again."""
    data = scenario.model_dump(mode="json")
    if seed is not None:
        data["seed"] = seed
    if rounds is not None:
        data["rounds"] = rounds
    if backend is not None:
        data["backend"]["kind"] = backend
    if strategies:
        # A strategy the scenario names keeps its params there; others get their defaults.
        # Results labels are unique: a label picks its entry; a bare name the entry it labels,
        # else the first entry of that name.
        named = {s["label"] or s["name"]: s for s in data["strategies"]}
        for s in data["strategies"]:
            named.setdefault(s["name"], s)
        # A strategy given as module:Class or file.py:Class is labelled by its class name.
        data["strategies"] = [named.get(n, {"name": n, "label": n.rpartition(":")[2] if ":" in n else None})
                              for n in strategies]
    updated = parse_scenario(data, f"{path} (with command-line overrides)")
    check_references(updated, path, strict_defaults=not strategies)
    return updated


def run_scenario(scenario: Scenario, progress: ProgressFn | None = None,
                 checkpoints: CheckpointStore | None = None, resume: bool = False) -> list[StrategyRun]:
    """Every strategy's run; with ``checkpoints``, each saved after every round and when it
    finishes. With ``resume``, finished strategies are taken from there, the others continue."""
    runs: list[StrategyRun] = []
    client_app = make_client_app(scenario)
    for index, spec in enumerate(scenario.strategies):
        saved = checkpoints.load(index, spec.run_label) if checkpoints is not None and resume else None
        if saved is not None and saved["complete"]:
            runs.append(run_from_state(spec.run_label, spec.name, saved["run"]))
            continue
        sink: list[StrategyRun] = []
        job = StrategyJob(scenario, spec, checkpoints, index, resume=saved is not None)
        run_backend(scenario.backend, make_server_app(job, sink, progress), client_app)
        if not sink:
            raise RuntimeError(f"strategy {spec.run_label} finished without a result")
        if checkpoints is not None:
            checkpoints.save(index, spec.run_label, complete=True, run=run_state(sink[0]))
        runs.extend(sink)
    return runs


def simulate(scenario: Scenario, scenario_path: str, out_dir: Path, progress: ProgressFn | None = None,
             *, resume: bool = False) -> tuple[list[StrategyRun], list[Path]]:
    """Run the scenario and write its results to ``out_dir``, checkpointing as it goes.

    Without ``resume`` an earlier checkpoint in ``out_dir`` is discarded first.
    """
    started = time.perf_counter()
    checkpoints = CheckpointStore(out_dir, scenario)
    if not resume:
        checkpoints.clear()
    runs = run_scenario(scenario, progress, checkpoints, resume)
    header = {
        "scenario": scenario.name, "scenario_file": str(scenario_path), "seed": scenario.seed,
        "rounds": scenario.rounds, "backend": scenario.backend.kind, "devices": scenario.population.devices,
        "dataset": scenario.data.dataset, "versions": versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "scenario_config": scenario.model_dump(mode="json"),
    }
    written = write_results(out_dir, runs, header)
    checkpoints.clear()  # the results are whole: nothing left to resume
    return runs, written
