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

from collections.abc import Callable, Iterable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..contract import DeviceCall
from ..device_tasks import task_for, tasks_of
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
    app = ClientApp()
    scenario_of = scenario if callable(scenario) else (lambda context: scenario)
    for message_type, (owner, _) in sorted(tasks_of(strategy_names).items()):
        category, _, action = message_type.partition(".")
        register = getattr(app, category)
        (register(action) if action else register())(_bound(owner, message_type, scenario_of))
    return app


def _bound(owner: str, message_type: str, scenario_of):
    def run(message: Message, context: Context) -> Message:
        # One thread per task: the same numbers on every backend, and executors
        # running side by side do not fight over cores.
        torch.set_num_threads(1)
        call = DeviceCall(simulation_context(scenario_of(context)), message)
        return task_for(owner, message_type)(call)

    return run
