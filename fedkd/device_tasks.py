"""The device tasks of a run: which function runs each message type, and who brought it.

Built from the run's strategies (:func:`fedkd.contract.task_table`) before
anything runs, and looked up again by name inside each executor process.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from .contract import BatchedTask, DeviceTask, declared_batched_tasks, task_table
from .registry import resolve_strategy
from .weight_training import WEIGHTS_BATCHED, evaluate_weights, train_weights

FEDKD = "fedkd"  # the owner of the built-in tasks
BUILTIN_TASKS: dict[str, DeviceTask] = {"train": train_weights, "evaluate": evaluate_weights}
BUILTIN_BATCHED: dict[str, BatchedTask] = {"train": WEIGHTS_BATCHED}


def portable_name(name: str) -> str:
    """``name`` as another process finds it: a plug-in file's path made absolute."""
    where, sep, attr = name.rpartition(":")
    if sep and (where.endswith(".py") or "/" in where):
        return f"{Path(where).expanduser().resolve()}:{attr}"
    return name


def tasks_of(strategy_names: Iterable[str]) -> dict[str, tuple[str, DeviceTask]]:
    """message type -> (strategy name, function) for a run of these strategies; one line
    (:class:`fedkd.errors.FedkdError`) when two claim one type or a task is malformed."""
    names = list(dict.fromkeys(portable_name(n) for n in strategy_names))
    classes = [(n, resolve_strategy(n).cls) for n in names]
    for _, cls in classes:
        declared_batched_tasks(cls)  # a malformed batched form fails now, not mid-run
    return task_table(classes, BUILTIN_TASKS)


@lru_cache(maxsize=256)
def task_for(owner: str, message_type: str) -> DeviceTask:
    """The function ``owner`` runs for ``message_type``, in this process."""
    if owner == FEDKD:
        return BUILTIN_TASKS[message_type]
    return dict(resolve_strategy(owner).cls.device_tasks)[message_type]


@lru_cache(maxsize=256)
def batched_task_for(owner: str, message_type: str) -> BatchedTask | None:
    """The batched form of ``owner``'s ``message_type`` task, if it has one."""
    if owner == FEDKD:
        return BUILTIN_BATCHED.get(message_type)
    return declared_batched_tasks(resolve_strategy(owner).cls).get(message_type)
