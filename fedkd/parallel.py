"""Independent (seed, strategy) runs side by side in worker processes.

Each run is a pure function of its scenario, seed and strategy (seeds derive
from them, server and client work on one thread each), so running several at
once changes nothing but the wall time. Workers are spawned, not forked (a
forked torch may deadlock in its thread pool), each loads the dataset once
and serves the runs the pool hands it; results come back as the same typed
``StrategyRun`` objects a run in this process gives.

Workers report each round as it ends (through a queue). On a terminal the runs
share one display (rich's, one row per run); elsewhere each round goes to the
caller's progress function, as a run in this process reports it.
"""
from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
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
                     progress_for: Callable[[int], ProgressFn | None] = lambda seed: None,
                     stream=None) -> list[StrategyRun]:
    """Run ``tasks`` on up to ``jobs`` worker processes. Every round of every run goes to
    ``progress_for(seed)``, or, when there is one and ``stream`` (stderr by default) is a
    terminal, to one rich display of all the runs instead."""
    level = logging.getLogger("flwr").level
    context = multiprocessing.get_context("spawn")
    rounds = context.SimpleQueue() if any(progress_for(t.scenario.seed) for t in tasks) else None
    stream = sys.stderr if stream is None else stream
    display = RunsDisplay(tasks, stream) if rounds is not None and stream.isatty() else None
    runs: list[StrategyRun] = []

    def report(message) -> None:
        index, label, record, total = message
        if display is not None:
            display.update(index, record, total)
        elif (progress := progress_for(tasks[index].scenario.seed)) is not None:
            progress(label, record, total)

    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                             initializer=_start_worker, initargs=(rounds,)) as pool, \
            (display or nullcontext()):
        futures = {pool.submit(_work, task, level, index): task for index, task in enumerate(tasks)}
        remaining = set(futures)
        try:
            while remaining:
                # Short waits: rounds are shown as they end, not when a whole run is done.
                finished, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(rounds, report)
                for future in finished:
                    runs.append(future.result())
            _drain(rounds, report)
        except BrokenProcessPool:
            raise FedkdError("a worker process died (out of memory?); the runs finished so far are "
                             "checkpointed: run the same command with --resume") from None
        except BaseException:
            for future in remaining:
                future.cancel()
            raise
    return runs


def _drain(rounds, report: Callable) -> None:
    while rounds is not None and not rounds.empty():
        report(rounds.get())


class RunsDisplay:
    """One rich progress display: a row per (strategy, seed) run, a bar over its rounds."""

    def __init__(self, tasks: list[RunTask], stream):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        several_seeds = len({t.scenario.seed for t in tasks}) > 1
        self.progress = Progress(
            TextColumn("{task.description:>20}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=Console(file=stream))
        self.rows = [self.progress.add_task(
            t.spec.run_label + (f" seed {t.scenario.seed}" if several_seeds else ""),
            total=t.scenario.rounds, note="", start=False) for t in tasks]

    def update(self, index: int, record, total: int) -> None:
        row = self.rows[index]
        self.progress.start_task(row)
        self.progress.update(row, completed=record.round, total=total,
                             note=f"acc {record.accuracy:.3f}  t={record.sim_time_s:,.0f}s")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


_CLIENT_APPS: dict[str, object] = {}  # per worker process: one ClientApp per scenario
_ROUNDS = None  # per worker process: where its runs report their rounds (None: nobody listens)


def _start_worker(rounds) -> None:
    global _ROUNDS
    _ROUNDS = rounds


def _work(task: RunTask, flwr_level: int, index: int) -> StrategyRun:
    import flwr.supercore.logger  # noqa: F401 - Flower sets its level on import; override it after

    logging.getLogger("flwr").setLevel(flwr_level)
    from .runtime.client import make_client_app

    key = task.scenario.model_dump_json()
    if key not in _CLIENT_APPS:
        _CLIENT_APPS.clear()
        _CLIENT_APPS[key] = make_client_app(task.scenario)
    rounds = _ROUNDS
    progress = None if rounds is None else (
        lambda label, record, total: rounds.put((index, label, record, total)))
    return run_task(task, _CLIENT_APPS[key], progress)


def run_task(task: RunTask, client_app, progress=None) -> StrategyRun:
    """Run one (strategy, seed) on ``client_app`` in this process; checkpoint it as finished."""
    from .runtime.backends import run_backend
    from .runtime.server import StrategyJob, make_server_app
    from .sim.recorder import run_state

    scenario, spec, checkpoints = task.scenario, task.spec, task.checkpoints
    sink: list[StrategyRun] = []
    job = StrategyJob(scenario, spec, checkpoints, task.index, resume=task.resumed)
    run_backend(scenario.backend, make_server_app(job, sink, progress), client_app)
    if not sink:
        raise RuntimeError(f"strategy {spec.run_label} finished without a result")
    [run] = sink
    # The server's recorder does not know the seed; set it before the final checkpoint, so a
    # resumed run reads it back.
    run.seed = scenario.seed
    if checkpoints is not None:
        checkpoints.save(task.index, spec.run_label, complete=True, run=run_state(run))
        checkpoints.finished(task.index, spec.run_label)  # its devices' state: kept only with --keep-state
    return run
