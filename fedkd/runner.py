"""``fedkd simulate``: run every strategy of a scenario, then write the results."""
from __future__ import annotations

import time
from pathlib import Path

from .references import check_references
from .report import versions, write_results
from .results import StrategyRun
from .runtime.backends import run_backend
from .runtime.client import make_client_app
from .runtime.server import ProgressFn, StrategyJob, make_server_app
from .scenario import Scenario, parse_scenario


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
        named = {s["name"]: s for s in data["strategies"]} | {s["label"]: s for s in data["strategies"] if s["label"]}
        # A strategy given as module:Class or file.py:Class is labelled by its class name.
        data["strategies"] = [named.get(n, {"name": n, "label": n.rpartition(":")[2] if ":" in n else None})
                              for n in strategies]
    updated = parse_scenario(data, f"{path} (with command-line overrides)")
    check_references(updated, path, strict_defaults=not strategies)
    return updated


def run_scenario(scenario: Scenario, progress: ProgressFn | None = None) -> list[StrategyRun]:
    runs: list[StrategyRun] = []
    client_app = make_client_app(scenario)
    for spec in scenario.strategies:
        sink: list[StrategyRun] = []
        run_backend(scenario.backend, make_server_app(StrategyJob(scenario, spec), sink, progress), client_app)
        if not sink:
            raise RuntimeError(f"strategy {spec.run_label} finished without a result")
        runs.extend(sink)
    return runs


def simulate(scenario: Scenario, scenario_path: str, out_dir: Path,
             progress: ProgressFn | None = None) -> tuple[list[StrategyRun], list[Path]]:
    started = time.perf_counter()
    runs = run_scenario(scenario, progress)
    header = {
        "scenario": scenario.name, "scenario_file": str(scenario_path), "seed": scenario.seed,
        "rounds": scenario.rounds, "backend": scenario.backend.kind, "devices": scenario.population.devices,
        "dataset": scenario.data.dataset, "versions": versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "scenario_config": scenario.model_dump(mode="json"),
    }
    return runs, write_results(out_dir, runs, header)
