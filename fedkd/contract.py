"""The strategy contract: what a strategy may bring to a fedkd run besides its Flower half.

A strategy is a Flower strategy (``flwr.serverapp.strategy.Strategy``, or one of
Flower's own such as ``FedAvg``, unmodified). That alone is enough: its devices
run fedkd's weight-training task (message type ``train``) and it is scored as a
weight-sharing strategy. A strategy that needs more also subclasses
:class:`FedkdStrategy` and declares, in one place:

- ``shares_weights``: whether it exchanges model weights (so every device runs
  the one global architecture) or not (devices keep models of their own);
- ``device_tasks``: the device half, message type -> function run inside the
  ClientApp with the device's data, models and travelling state
  (:class:`DeviceCall` -> reply ``Message``). The ClientApp's dispatch is built
  from the strategies of the run, so a plug-in file carries both halves;
- ``fedkd_setup(env)``: one hook before round 1 with a typed
  :class:`StrategyEnv` (the simulation context, the public set, the simulated
  network's extensions);
- how it is scored (:mod:`fedkd.scoring`): ``fedkd_panel_model`` (the
  ``fedkd.scoring.PanelScoring`` protocol) when a panel device runs neither
  the global model nor its own, ``fedkd_round_metrics``
  for extra columns, ``fedkd_labels_read`` for labelled data it read;
- ``fedkd_state`` / ``fedkd_restore``: what it keeps between rounds, for
  checkpoints;
- ``batched_tasks`` (optional): message type -> :class:`BatchedTask`, the same
  device task for several devices at once. With ``backend.batch_devices`` > 1
  the grid groups a phase's messages by the task's ``key`` and hands each group
  to ``run``, which must reply what ``device_tasks`` would, up to float rounding.

The default of every hook does nothing, so a subclass overrides only what it uses.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from .errors import FedkdError
from .protocol import COST, PREFIX, STATE, cost_record, task_of
from .seeding import derive_seed

if TYPE_CHECKING:
    from .context import DeviceView, SimulationContext
    from .scenario import Scenario, TopologySpec
    from .sim.grid import NodeProfile
    from .sim.telemetry import Telemetry

# Flower's message categories; a device task is "<category>" or "<category>.<action>".
CATEGORIES = ("train", "evaluate", "query")


@dataclass(frozen=True)
class PublicSet:
    """What the server knows of the shared public set (it holds the same copy as the devices)."""

    size: int
    num_classes: int
    seed: int


class SimulatedNetwork(Protocol):
    """The simulated grid's extensions of Flower's Grid a strategy may use."""

    topology: TopologySpec | None

    def node_profiles(self, node_ids: Iterable[int]) -> dict[int, NodeProfile]:
        """Each device's registration: class, model size, sensors (static facts)."""

    def telemetry(self) -> Telemetry:
        """The devices' last reports (stale and noisy as configured), never the truth."""

    def backhaul(self, transfers: dict[int, tuple[int, int, float]]) -> float:
        """Fog <-> cloud traffic of a fog-tier strategy: per fog (bytes up, bytes down, FLOPs).
        Counted by the run's recorder; returns the time it took, in s."""


@dataclass(frozen=True)
class StrategyEnv:
    """What a run hands a strategy before round 1.

    ``ctx`` is the simulation context (scenario, dataset, population, device
    views, model builders, FLOP counts); ``public`` the shared public set;
    ``network`` the simulated grid's extensions. Unit tests may leave out what
    the strategy under test does not read.
    """

    ctx: SimulationContext | None = None
    public: PublicSet | None = None
    network: SimulatedNetwork | None = None

    @classmethod
    def of(cls, ctx: SimulationContext, network: SimulatedNetwork | None = None) -> "StrategyEnv":
        """The environment of a run of ``ctx``'s scenario."""
        public = PublicSet(len(ctx.dataset.split("public")), ctx.dataset.num_classes, ctx.scenario.seed)
        return cls(ctx, public, network)


@dataclass(frozen=True)
class DeviceCall:
    """One device task as the ClientApp runs it: which device, which round, and the message."""

    ctx: SimulationContext
    message: Message

    @classmethod
    def of(cls, scenario: Scenario, message: Message) -> "DeviceCall":
        """The call an executor would make for ``message`` in a run of ``scenario`` (for tests)."""
        from .context import simulation_context

        return cls(simulation_context(scenario), message)

    @property
    def scenario(self) -> Scenario:
        return self.ctx.scenario

    @cached_property
    def device_id(self) -> int:
        return int(task_of(self.message)["device_id"])

    @cached_property
    def server_round(self) -> int:
        return int(task_of(self.message)["round"])

    @cached_property
    def device(self) -> DeviceView:
        """The device's sensors, shard and model size."""
        return self.ctx.device(self.device_id)

    @property
    def state(self) -> Any:
        """The device's own state as it last replied it (None on its first task)."""
        return self.message.content.get(STATE)

    def config(self, key: str | None = None) -> ConfigRecord:
        """The strategy's ConfigRecord ``key``; without a key its first one (whatever its key),
        or an empty one."""
        if key is not None:
            return self.message.content.config_records[key]
        configs = [v for k, v in self.message.content.config_records.items() if not k.startswith(PREFIX)]
        return configs[0] if configs else ConfigRecord()

    def arrays(self) -> tuple[str, ArrayRecord]:
        """The strategy's one ArrayRecord and the key it used."""
        found = [(k, v) for k, v in self.message.content.array_records.items() if not k.startswith(PREFIX)]
        if len(found) != 1:
            raise ValueError(f"expected one ArrayRecord from the strategy, got {[k for k, _ in found]}")
        return found[0]

    def seed(self, *keys: Any) -> int:
        """A seed for this run keyed by ``keys`` (for example ``"train", round, device``)."""
        return derive_seed(self.scenario.seed, *keys)

    def reply(self, records: Mapping[str, Any], flops: float, state: Any = None) -> Message:
        """The reply: ``records`` (counted as uplink traffic), the FLOPs the device spent
        (the simulated world times the task by them), and its new state (kept for its next
        task, not counted as traffic)."""
        content = RecordDict(dict(records))
        content[COST] = cost_record(flops)
        if state is not None:
            content[STATE] = state
        return Message(content, reply_to=self.message)


DeviceTask = Callable[[DeviceCall], Message]


@dataclass(frozen=True)
class BatchedTask:
    """A device task's batched form.

    ``key(call)``: calls with equal keys (not None) may run as one batch: the same
    architecture and training configuration. None: this call goes one by one.
    ``run(calls)``: one reply per call, in order, as the one-by-one task would give
    them up to float rounding. If ``run`` raises, the group's calls run one by one.
    """

    key: Callable[[DeviceCall], Any]
    run: Callable[[list[DeviceCall]], list[Message]]


class FedkdStrategy:
    """fedkd's optional half of a strategy. Put it beside the Flower base class:
    ``class MyKD(FedkdStrategy, Strategy)``. Every hook has a default."""

    shares_weights: ClassVar[bool] = True
    device_tasks: ClassVar[Mapping[str, DeviceTask]] = {}
    batched_tasks: ClassVar[Mapping[str, BatchedTask]] = {}
    env: StrategyEnv = StrategyEnv()

    def fedkd_setup(self, env: StrategyEnv) -> None:
        """Called once before round 1 (and before a resumed run's first round)."""
        self.env = env

    def fedkd_state(self) -> dict:
        """What later rounds depend on besides the global arrays (tensors, numbers,
        strings, arrays, records and containers of them), for checkpoints."""
        return {}

    def fedkd_restore(self, state: dict) -> None:
        """Take back what :meth:`fedkd_state` returned."""

    def fedkd_round_metrics(self, ctx: SimulationContext, device_state: Mapping[int, Any]) -> dict[str, float]:
        """Extra columns of a round's row (after the scoring protocol's own)."""
        return {}

    def fedkd_labels_read(self) -> dict[str, np.ndarray]:
        """Labelled public samples the strategy read, by purpose (indices)."""
        return {}


def shares_weights(cls: type) -> bool:
    return bool(getattr(cls, "shares_weights", True)) if issubclass(cls, FedkdStrategy) else True


def declared_tasks(cls: type) -> Mapping[str, Any]:
    """The device tasks a strategy class declares (none for a Flower-only strategy)."""
    return dict(cls.device_tasks) if issubclass(cls, FedkdStrategy) else {}


def declared_batched_tasks(cls: type) -> Mapping[str, BatchedTask]:
    """The batched forms a strategy class declares, checked against its device tasks."""
    batched = dict(getattr(cls, "batched_tasks", {})) if issubclass(cls, FedkdStrategy) else {}
    for message_type, form in batched.items():
        if message_type not in declared_tasks(cls):
            raise FedkdError(f"strategy {cls.__name__}: batched task {message_type!r} is not one of its "
                             f"device_tasks {sorted(declared_tasks(cls))}")
        if not isinstance(form, BatchedTask):
            raise FedkdError(f"strategy {cls.__name__}: batched task {message_type!r} is of type "
                             f"{type(form).__name__}, expected fedkd.contract.BatchedTask(key, run)")
    return batched


def task_table(strategies: Iterable[tuple[str, type]], builtin: Mapping[str, DeviceTask]
               ) -> dict[str, tuple[str, DeviceTask]]:
    """message type -> (who brought it, function), from fedkd's own tasks and each
    (name, class) of the run. One line naming both when two bring different functions
    for one message type, or when a task is not a function or its type no Flower message."""
    table: dict[str, tuple[str, DeviceTask]] = {t: ("fedkd", fn) for t, fn in builtin.items()}
    for name, cls in strategies:
        for message_type, fn in declared_tasks(cls).items():
            problem = _type_problem(message_type)
            if problem:
                raise FedkdError(f"strategy {name}: device task {message_type!r}: {problem}")
            if not callable(fn):
                raise FedkdError(f"strategy {name}: device task {message_type!r} is of type {type(fn).__name__}, "
                                 "not a function taking a DeviceCall")
            owner = table.get(message_type)
            if owner is not None and owner[1] is not fn:
                raise FedkdError(f"strategies {owner[0]} and {name} both claim device task {message_type!r}; "
                                 "give one of them another action name")
            if owner is None:
                table[message_type] = (name, fn)
    return table


def _type_problem(message_type: Any) -> str | None:
    if not isinstance(message_type, str):
        return f"expected a message type like 'train.mytask', got a {type(message_type).__name__}"
    category, _, action = message_type.partition(".")
    if category not in CATEGORIES:
        return f"expected '<category>.<action>' with category one of {list(CATEGORIES)}"
    if not action:
        return f"'{category}' alone is fedkd's own task; name yours '{category}.<action>'"
    if not action.replace("_", "").replace("-", "").isalnum():
        return "the action may hold letters, digits, '_' and '-' only"
    return None


__all__ = ["BatchedTask", "DeviceCall", "DeviceTask", "FedkdStrategy", "SimulatedNetwork",
           "StrategyEnv", "task_table"]
