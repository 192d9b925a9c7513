"""``fedkd simulate``: run every strategy of a scenario, then write the results.

``simulate`` checkpoints the run in the results folder after every round and
removes the checkpoint once the results are written; with ``resume=True`` it
continues from that checkpoint (:mod:`fedkd.checkpoint`). A scenario with
several seeds (``seeds``, or ``--seeds``) runs every strategy once per seed,
each seed on the scenario with ``seed`` replaced.
"""
from __future__ import annotations

import time
from pathlib import Path

from flwr.clientapp import ClientApp

from .checkpoint import CheckpointStore, scenario_seeds
from .errors import FedkdError, ScenarioError
from .checks import check_references
from .report import default_baseline, versions, write_results
from .results import StrategyRun
from .runtime.backends import ray_address_problem
from .runtime.client import make_client_app
from .runtime.server import ProgressFn
from .scenario import Scenario, parse_scenario
from .sizes import check_sizes
from .parallel import RunTask, run_in_processes, run_task
from .sim.recorder import run_from_state


def with_overrides(scenario: Scenario, path: str, *, seed: int | None = None, seeds: list[int] | None = None,
                   rounds: int | None = None, strategies: list[str] | None = None,
                   backend: str | None = None) -> Scenario:
    """The scenario with command-line overrides applied and validated again.

    ``seed`` makes it a one-seed run (the scenario's ``seeds`` are dropped);
    ``seeds`` replaces the scenario's list. The command line never gives both.
    """
    data = scenario.model_dump(mode="json")
    if seed is not None:
        data["seed"], data["seeds"] = seed, None
    if seeds is not None:
        data["seeds"] = list(seeds)
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


def for_seed(scenario: Scenario, seed: int) -> Scenario:
    """The one-seed scenario that ``seed`` runs: ``seed`` replaced, ``seeds`` dropped.

    Dropping ``seeds`` makes it the very scenario a one-seed run of that seed
    would be, so it computes (and caches its context) the same.
    """
    return scenario.model_copy(update={"seed": seed, "seeds": None})


def run_scenario(scenario: Scenario, progress: ProgressFn | None = None,
                 checkpoints: CheckpointStore | None = None, resume: bool = False,
                 jobs: int = 1) -> list[StrategyRun]:
    """Every strategy's run for every seed, ordered by strategy (scenario order), then seed.

    With ``checkpoints``, each (seed, strategy) is saved after every round and when it
    finishes. With ``resume``, finished ones are taken from there, the others continue.
    With several seeds ``progress`` sees the label ``"<label> seed <s>"``. With ``jobs`` > 1,
    up to ``jobs`` (seed, strategy) runs go side by side, with the same results as one after
    another: on the in-process backend in worker processes (:mod:`fedkd.parallel`), on the ray
    backend as Ray tasks, each running its devices in-process (:mod:`fedkd.ray_jobs`).
    """
    seeds = scenario_seeds(scenario)
    done: list[StrategyRun] = []
    pending: list[RunTask] = []
    for seed in seeds:
        one = for_seed(scenario, seed)
        store = checkpoints.for_seed(seed) if checkpoints is not None else None
        for index, spec in enumerate(one.strategies):
            saved = store.load(index, spec.run_label) if store is not None and resume else None
            if saved is not None and saved["complete"]:
                run = run_from_state(spec.run_label, spec.name, saved["run"])
                run.seed = seed  # also for a checkpoint written before runs kept their seed
                done.append(run)
            else:
                pending.append(RunTask(one, index, store, resumed=saved is not None))
    def progress_for(seed: int) -> ProgressFn | None:
        return _tag_progress(progress, seed) if progress is not None and len(seeds) > 1 else progress

    if jobs > 1 and len(pending) > 1 and scenario.backend.kind == "inprocess":
        done.extend(run_in_processes(pending, jobs, progress_for))
    elif jobs > 1 and len(pending) > 1 and scenario.backend.kind == "ray":
        from .ray_jobs import run_on_ray

        done.extend(run_on_ray(pending, jobs, scenario.backend, progress_for))
    else:
        apps: dict[int, ClientApp] = {}  # one ClientApp per seed's scenario, built when first needed
        for task in pending:
            seed = task.scenario.seed
            if seed not in apps:
                apps[seed] = make_client_app(task.scenario)
            done.append(run_task(task, apps[seed], progress_for(seed)))
    order = {spec.run_label: i for i, spec in enumerate(scenario.strategies)}
    return sorted(done, key=lambda run: (order[run.label], run.seed))


def _tag_progress(progress: ProgressFn, seed: int) -> ProgressFn:
    return lambda label, record, total: progress(f"{label} seed {seed}", record, total)


def baseline_label(scenario: Scenario, name: str | None) -> str:
    """The strategy the others are compared with: ``name`` (a run label of the scenario), else
    :func:`fedkd.report.default_baseline`. FedkdError (one line) for an unknown name."""
    labels = [s.run_label for s in scenario.strategies]
    if name is None:
        return default_baseline([(s.run_label, s.name) for s in scenario.strategies])
    if name not in labels:
        raise FedkdError(f"--baseline {name}: expected one of the run's strategies {labels}")
    return name


def simulate(scenario: Scenario, scenario_path: str, out_dir: Path, progress: ProgressFn | None = None,
             *, resume: bool = False, baseline: str | None = None, jobs: int = 1, keep_state: bool = False
             ) -> tuple[list[StrategyRun], list[Path]]:
    """Run the scenario and write its results to ``out_dir``, checkpointing as it goes.

    Without ``resume`` an earlier checkpoint in ``out_dir`` is discarded first.
    ``baseline``: see :func:`baseline_label`; ``jobs``: see :func:`run_scenario`.
    ``keep_state``: leave the devices' state stores in ``<out>/.state/`` (fedkd.sim.state_store).
    """
    baseline = baseline_label(scenario, baseline)  # an unknown name fails before anything runs
    seeds = scenario_seeds(scenario)
    started = time.perf_counter()
    # Memory for the population, disk for the devices' state: refused now, in one line, if absurd.
    runs_at_once = len(seeds) * len(scenario.strategies)
    check_sizes(scenario, str(scenario_path), out_dir,
                stores_at_once=runs_at_once if keep_state else max(1, min(jobs, runs_at_once)))
    if scenario.backend.kind == "ray" and (problem := ray_address_problem(scenario.backend.address)):
        raise ScenarioError(str(scenario_path), "backend.address", problem)
    if keep_state and scenario.backend.kind == "ray" and jobs > 1 and runs_at_once > 1:
        raise FedkdError("--keep-state with runs as Ray tasks (the ray backend, --jobs above 1): each task "
                         "keeps its devices' state on its own node, not in the results folder; add --jobs 1")
    checkpoints = CheckpointStore(out_dir, scenario, keep_state=keep_state)
    if not resume:
        checkpoints.clear()
    runs = run_scenario(scenario, progress, checkpoints, resume, jobs)
    header = {
        # "seed": the run's only seed; with several, the first (older readers expect a number).
        "scenario": scenario.name, "scenario_file": str(scenario_path), "seed": seeds[0], "seeds": seeds,
        "rounds": scenario.rounds, "backend": scenario.backend.kind, "devices": scenario.population.devices,
        "dataset": scenario.data.dataset, "versions": versions(),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "scenario_config": scenario.model_dump(mode="json"),
    }
    written = write_results(out_dir, runs, header, baseline=baseline)
    checkpoints.clear(keep_state=keep_state)  # the results are whole: nothing left to resume
    return runs, written
