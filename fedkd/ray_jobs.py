"""Independent (seed, strategy) runs side by side as Ray tasks, on a Ray cluster or a local Ray.

``fedkd simulate ... --jobs N`` with ``backend: {kind: ray}`` and more than one
run to do: each run is one Ray task (one CPU; a GPU with cuda) that runs its devices on the
in-process backend on whichever node Ray places it, so a cluster of many
machines runs many runs at once, none waiting for Ray's per-run start-up.
A run's result is computed exactly as ``--jobs 1`` on the in-process backend
computes it (every draw is keyed by seed, round and device, one thread per
task), so the files equal those of a run one after another on this machine.

Why not Flower's simulation engine inside each task: ``run_simulation`` starts
or joins Ray itself, and nesting it in a Ray task is not supported; with one
run, or ``--jobs 1``, the ray backend still runs each run through it.

Checkpoints: the nodes' disks are not the results folder's, so a task keeps
its devices' state in a private temporary store on its node and this process
checkpoints each run when its result arrives. An interrupted ``--resume``
skips the runs that finished and restarts the others from their first round
(same results; the work of their finished rounds is lost).

Every node needs the same environment: fedkd installed, and the scenario's
data files and plug-in strategy files at the same paths (README, "On a Ray
cluster").
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import FedkdError
from .parallel import RoundReports, RunTask, run_failed, save_finished

if TYPE_CHECKING:
    from .results import StrategyRun
    from .runtime.server import ProgressFn
    from .scenario import BackendSpec


def run_on_ray(tasks: list[RunTask], jobs: int, backend: BackendSpec,
               progress_for: Callable[[int], ProgressFn | None] = lambda seed: None,
               stream=None) -> list[StrategyRun]:
    """Run ``tasks``, at most ``jobs`` at once, as Ray tasks on the cluster at ``backend.address``
    (else on a Ray started here with ``backend.executors`` CPUs, stopped at the end); each
    finished run is checkpointed here. Rounds are reported as :class:`fedkd.parallel.RoundReports`
    says. A run that fails is a FedkdError naming it; the runs still going are cancelled."""
    try:
        import ray
        from ray.util.queue import Queue
    except ImportError:
        raise FedkdError('the ray backend needs Ray: pip install "flwr[simulation]"') from None
    from .runtime.backends import check_ray_address, default_executors

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    connected_here = not ray.is_initialized()
    if connected_here:
        check_ray_address(backend.address)
        where = ({"address": backend.address} if backend.address else
                 {"num_cpus": backend.executors or default_executors(), "include_dashboard": False})
        try:
            ray.init(**where, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FedkdError(f"backend.address {backend.address}: cannot join the Ray cluster "
                             f"({_first_line(exc)})" if backend.address else
                             f"cannot start Ray here ({_first_line(exc)})") from None
    reports = RoundReports(tasks, progress_for, stream)
    inflight: dict = {}
    try:
        rounds = Queue(actor_options={"num_cpus": 0}) if reports.wanted else None
        # Ray retries a task whose worker or node died (the run is deterministic, so a retry
        # gives the same result); an exception the run raises is not retried.
        remote_run = ray.remote(**task_resources(backend))(_ray_work)
        level = logging.getLogger("flwr").level
        waiting = list(enumerate(tasks))
        runs: list[StrategyRun] = []
        with reports:
            while waiting or inflight:
                while waiting and len(inflight) < jobs:
                    index, task = waiting.pop(0)
                    inflight[remote_run.remote(_on_node(task), level, index, rounds)] = task
                # Short waits: rounds are shown as they end, not when a whole run is done.
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.2)
                _drain(rounds, reports)
                for ref in ready:
                    task = inflight.pop(ref)
                    run = _result(ray, ref, task)
                    save_finished(task, run)
                    runs.append(run)
            _drain(rounds, reports)
        return runs
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)
        if connected_here:
            ray.shutdown()  # leaves a cluster at an address running; stops a Ray started here


def task_resources(backend: BackendSpec) -> dict[str, float]:
    """What one run asks Ray for: a CPU (its devices and server run on one thread), and with
    ``torch_device: cuda`` a GPU of its own (Ray shows a task only the GPUs it asked for)."""
    return {"num_cpus": 1, "num_gpus": 1 if backend.torch_device == "cuda" else 0}


def _on_node(task: RunTask) -> RunTask:
    """The task as a node runs it: devices in-process (with the scenario's batching and torch
    device), no checkpoint store (this process checkpoints the finished run)."""
    backend = task.scenario.backend.model_copy(update={"kind": "inprocess"})
    return RunTask(task.scenario.model_copy(update={"backend": backend}), task.index, None)


def _result(ray, ref, task: RunTask) -> StrategyRun:
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, FedkdError):
            raise cause from None
        raise run_failed(task.name, cause) from None
    except RayError as exc:  # a worker or node lost for good, after Ray's retries
        raise FedkdError(f"run {task.name}: its Ray worker was lost ({type(exc).__name__}: {_first_line(exc)}); "
                         "the runs finished so far are checkpointed: run the same command with --resume"
                         ) from None


def _drain(rounds, reports: RoundReports) -> None:
    if rounds is not None:
        for message in rounds.get_nowait_batch(rounds.qsize()):
            reports(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ray_work(task: RunTask, flwr_level: int, index: int, rounds) -> StrategyRun:
    """On a Ray worker: run ``task``, its rounds to ``rounds`` (a Ray queue) if anybody listens."""
    from . import parallel

    parallel._start_worker(rounds)
    return parallel._work(task, flwr_level, index)
