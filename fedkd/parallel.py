"""Independent (seed, strategy) runs side by side in worker processes.

Each run is a pure function of its scenario, seed and strategy (seeds derive
from them, server and client work on one thread each), so running several at
once changes nothing but the wall time. Workers are spawned, not forked (a
forked torch may deadlock in its thread pool), each loads the dataset once
and serves the runs the pool hands it; results come back as the same typed
``StrategyRun`` objects a run in this process gives.
"""
from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import FedkdError

if TYPE_CHECKING:
    from .checkpoint import CheckpointStore
    from .results import StrategyRun
    from .runtime.server import ProgressFn
    from .scenario import Scenario, StrategySpec


@dataclass(frozen=True)
class RunTask:
    """One (seed, strategy) run: a one-seed scenario and the strategy's place in its list."""

    scenario: Scenario
    index: int
    checkpoints: CheckpointStore | None
    resumed: bool = False

    @property
    def spec(self) -> StrategySpec:
        return self.scenario.strategies[self.index]


def run_in_processes(tasks: list[RunTask], jobs: int,
                     progress_for: Callable[[int], ProgressFn | None] = lambda seed: None) -> list[StrategyRun]:
    """Run ``tasks`` on up to ``jobs`` worker processes; ``progress_for(seed)`` sees each run's
    last round when it comes back."""
    level = logging.getLogger("flwr").level
    context = multiprocessing.get_context("spawn")
    runs: list[StrategyRun] = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
        futures = {pool.submit(_work, task, level): task for task in tasks}
        remaining = set(futures)
        try:
            while remaining:
                finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for future in finished:
                    run = future.result()
                    runs.append(run)
                    progress = progress_for(run.seed)
                    if progress is not None and run.rounds:
                        progress(run.label, run.rounds[-1], futures[future].scenario.rounds)
        except BrokenProcessPool:
            raise FedkdError("a worker process died (out of memory?); the runs finished so far are "
                             "checkpointed: run the same command with --resume") from None
        except BaseException:
            for future in remaining:
                future.cancel()
            raise
    return runs


_CLIENT_APPS: dict[str, object] = {}  # per worker process: one ClientApp per scenario


def _work(task: RunTask, flwr_level: int) -> StrategyRun:
    import flwr.supercore.logger  # noqa: F401 - Flower sets its level on import; override it after

    logging.getLogger("flwr").setLevel(flwr_level)
    from .runner import _run_strategy
    from .runtime.client import make_client_app

    key = task.scenario.model_dump_json()
    if key not in _CLIENT_APPS:
        _CLIENT_APPS.clear()
        _CLIENT_APPS[key] = make_client_app(task.scenario)
    return _run_strategy(task, _CLIENT_APPS[key], None)
