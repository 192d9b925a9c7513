"""The ClientApp: executes one device's task, whichever device the message names.

Executor nodes are not devices: the simulated grid puts the device id in each
message (``fedkd.task``), and the client loads that device's shard, sensors
and model size from the scenario. It reports the FLOPs it spent
(``fedkd.cost``) so the simulated world can time the work.

Which function runs a message is looked up by its type in a table built from
the strategies of the run (:func:`fedkd.device_tasks.tasks_of`): fedkd's own
weight-training tasks (``train``, ``evaluate``, for any Flower strategy) and
each strategy's ``device_tasks``. An executor finds a task by the name of the
strategy that brought it, so the ClientApp carries names, not code, to remote
executors (a strategy in a plug-in file is loaded there from its path).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..contract import DeviceCall
from ..device_tasks import batched_task_for, task_for, tasks_of
from ..registry import registered_strategies
from ..scenario import Scenario
from ..context import simulation_context

def make_client_app(scenario: Scenario | Callable[[Context], Scenario],
                    strategy_names: Iterable[str] | None = None) -> ClientApp:
    """A ClientApp for ``scenario``'s strategies, or for ``strategy_names`` when the scenario
    is found only at run time, in the run's context (as under ``flwr run``; default: every
    registered strategy). The closure holds the scenario and strategy names, nothing else."""
    if strategy_names is None:
        strategy_names = ([s.name for s in scenario.strategies] if not callable(scenario)
                          else list(registered_strategies()))
    scenario_of = scenario if callable(scenario) else (lambda context: scenario)
    table = tasks_of(strategy_names)
    app = FedkdClientApp(scenario_of, {t: owner for t, (owner, _) in table.items()})
    for message_type, (owner, _) in sorted(table.items()):
        category, _, action = message_type.partition(".")
        register = getattr(app, category)
        (register(action) if action else register())(_bound(owner, message_type, scenario_of))
    return app


class FedkdClientApp(ClientApp):
    """Flower's ClientApp (one message at a time, as every Flower runtime calls it) that
    can also run several devices' tasks as one batched computation: fedkd's own grids
    (in-process, processes) ask it for :meth:`batch_units` and call :meth:`run_batch`."""

    def __init__(self, scenario_of: Callable[[Context], Scenario], owners: dict[str, str]):
        super().__init__()
        self.scenario_of, self.owners = scenario_of, owners

    def batch_units(self, messages: Sequence[Message], context: Context) -> list[list[int]]:
        """``messages`` (by index) as units of work: groups of at most
        ``backend.batch_devices`` whose tasks have a batched form and equal keys, in the
        order of their first message; every other message alone. Fixed by the messages
        and the scenario, so every backend makes the same batches."""
        scenario = self.scenario_of(context)
        size = scenario.backend.batch_devices
        if size <= 1 or len(messages) <= 1:
            return [[i] for i in range(len(messages))]
        ctx = simulation_context(scenario)
        groups: dict[object, list[int]] = {}
        for i, message in enumerate(messages):
            message_type = message.metadata.message_type
            batched = batched_task_for(self.owners[message_type], message_type) \
                if message_type in self.owners else None
            key = None
            if batched is not None:
                try:
                    key = batched.key(DeviceCall(ctx, message))
                except Exception:  # noqa: BLE001 - a malformed message fails one by one, with its own reason
                    key = None
            groups.setdefault((message_type, key) if key is not None else ("alone", i), []).append(i)
        units = [group[start:start + size] for group in groups.values() for start in range(0, len(group), size)]
        return sorted(units, key=lambda unit: unit[0])

    def run_batch(self, messages: Sequence[Message], context: Context) -> list[Message]:
        """Replies to one unit of :meth:`batch_units` of two or more messages (raises if the
        batched form does; the grid then runs them one by one)."""
        torch.set_num_threads(1)
        message_type = messages[0].metadata.message_type
        batched = batched_task_for(self.owners[message_type], message_type)
        ctx = simulation_context(self.scenario_of(context))
        replies = batched.run([DeviceCall(ctx, m) for m in messages])
        if len(replies) != len(messages):
            raise RuntimeError(f"the batched form of {message_type!r} gave {len(replies)} replies "
                               f"to {len(messages)} messages")
        return replies


def _bound(owner: str, message_type: str, scenario_of):
    def run(message: Message, context: Context) -> Message:
        # One thread per task: the same numbers on every backend, and executors
        # running side by side do not fight over cores.
        torch.set_num_threads(1)
        call = DeviceCall(simulation_context(scenario_of(context)), message)
        return task_for(owner, message_type)(call)

    return run
