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
import sysconfig
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FedkdError, RunFailed

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

    @property
    def name(self) -> str:
        """How messages name the run: ``<label> seed <s>``."""
        return f"{self.spec.run_label} seed {self.scenario.seed}"


def run_in_processes(tasks: list[RunTask], jobs: int,
                     progress_for: Callable[[int], ProgressFn | None] = lambda seed: None,
                     stream=None) -> list[StrategyRun]:
    """Run ``tasks`` on up to ``jobs`` worker processes. Every round of every run goes to
    ``progress_for(seed)``, or, when there is one and ``stream`` (stderr by default) is a
    terminal, to one rich display of all the runs instead."""
    level = logging.getLogger("flwr").level
    context = multiprocessing.get_context("spawn")
    reports = RoundReports(tasks, progress_for, stream)
    rounds = context.SimpleQueue() if reports.wanted else None
    runs: list[StrategyRun] = []
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context,
                             initializer=_start_worker, initargs=(rounds,)) as pool, reports:
        futures = {pool.submit(_work, task, level, index): task for index, task in enumerate(tasks)}
        remaining = set(futures)
        try:
            while remaining:
                # Short waits: rounds are shown as they end, not when a whole run is done.
                finished, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(rounds, reports)
                for future in finished:
                    runs.append(future.result())
            _drain(rounds, reports)
        except BrokenProcessPool:
            raise FedkdError("a worker process died (out of memory?); the runs finished so far are "
                             "checkpointed: run the same command with --resume") from None
        except BaseException:
            for future in remaining:
                future.cancel()
            raise
    return runs


class RoundReports:
    """Where the rounds the runs report go: to one rich display when ``stream`` (stderr by
    default) is a terminal, else to ``progress_for(seed)`` of the run's seed, as a run in this
    process reports them. A context manager: the display shows while it lasts."""

    def __init__(self, tasks: list[RunTask], progress_for: Callable[[int], ProgressFn | None], stream=None):
        self.tasks, self.progress_for = tasks, progress_for
        self.wanted = any(progress_for(t.scenario.seed) for t in tasks)
        stream = sys.stderr if stream is None else stream
        self.display = RunsDisplay(tasks, stream) if self.wanted and stream.isatty() else None

    def __call__(self, message) -> None:
        index, label, record, total = message
        if self.display is not None:
            self.display.update(index, record, total)
        elif (progress := self.progress_for(self.tasks[index].scenario.seed)) is not None:
            progress(label, record, total)

    def __enter__(self):
        if self.display is not None:
            self.display.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.display is not None:
            self.display.__exit__(*exc)


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
    """Run ``task`` in this worker (its ClientApp built once per scenario); its rounds go to the
    worker's queue, if anybody listens."""
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

    scenario, spec, checkpoints = task.scenario, task.spec, task.checkpoints
    sink: list[StrategyRun] = []
    job = StrategyJob(scenario, spec, checkpoints, task.index, resume=task.resumed)
    try:
        run_backend(scenario.backend, make_server_app(job, sink, progress), client_app)
    except FedkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a strategy raises, the user gets one line
        raise run_failed(task.name, exc) from exc
    if not sink:  # the backend returned without the server's result and without raising
        raise RunFailed(f"run {task.name} ended without a result; the backend "
                        "logged why: run the same command with -v to see Flower's log")
    [run] = sink
    # The server's recorder does not know the seed; set it before the final checkpoint, so a
    # resumed run reads it back.
    run.seed = scenario.seed
    save_finished(task, run)
    return run


def save_finished(task: RunTask, run: StrategyRun) -> None:
    """Checkpoint ``task``'s finished ``run`` (if the task has a checkpoint store), so a resumed
    run skips it."""
    from .sim.recorder import run_state

    if task.checkpoints is not None:
        task.checkpoints.save(task.index, task.spec.run_label, complete=True, run=run_state(run))
        task.checkpoints.finished(task.index, task.spec.run_label)  # devices' state: kept only with --keep-state


def run_failed(run: str, exc: Exception) -> RunFailed:
    """``exc``, raised while ``run`` ran, as one line: the exception and the innermost frame of
    code outside the installed packages and the standard library (a plug-in's, usually), else
    the innermost frame; the finished runs' checkpoints let a fixed run continue."""
    frames = traceback.extract_tb(exc.__traceback__)
    installed = (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"])
    own = [f for f in frames if not f.filename.startswith(installed)
           and not f.filename.startswith(str(Path(__file__).parent))]
    frame = (own or frames or [None])[-1]
    where = f" (at {frame.filename}:{frame.lineno}, in {frame.name})" if frame is not None else ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return RunFailed(
        f"run {run} failed: {type(exc).__name__}{': ' + text if text else ''}{where}; the runs finished "
        "so far are checkpointed: once it is fixed, run the same command with --resume (-v prints the traceback)",
        "".join(traceback.format_exception(exc)))
