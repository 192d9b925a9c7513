"""The simulated grid: Flower's ``Grid`` as the strategy sees it, backed by the
simulated device population.

Strategies talk to this grid exactly as to a real one. ``get_node_ids``
returns the devices that are online and alive now (device ids are node ids).
Each message is executed by the ClientApp on one of the real grid's executor
nodes, carrying the device id and the device's own state; then its timeline
runs in the SimPy world with the real payload bytes and the FLOPs the client
spent. A device that goes offline, runs flat or misses the deadline yields an
error reply, exactly as a failed node does in Flower.

Records whose key starts with ``d2d.`` travel device to device, not through
the server: a task's are what the device receives from its neighbours (one
message each), a reply's go to each of its ``fanout`` neighbours (the task's
``fedkd.d2d`` record says how many). The world times them on the devices' D2D
radio; ``bytes_up`` / ``bytes_down`` keep counting the server link only.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from ..protocol import STATE, payload_bytes, reported_flops, strategy_view, with_task
from ..scenario import TopologySpec
from ..seeding import derive_seed
from .recorder import RoundRecorder
from .replies import reply_problem
from .state_store import DeviceStateStore
from .telemetry import Telemetry
from .world import OK, DeviceWorld, TaskCost, TaskOutcome

D2D_PREFIX = "d2d."  # records timed on the device-to-device radio
D2D_ROUTE = "fedkd.d2d"  # ConfigRecord {"fanout": n}: a reply's d2d. records go to n neighbours

ERROR_CODES = {
    "deadline": ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    "offline": ErrorCode.NODE_UNAVAILABLE,
    "battery": ErrorCode.NODE_UNAVAILABLE,
    "error": ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
    "timeout": ErrorCode.REPLY_MESSAGE_UNAVAILABLE,  # the ClientApp gave no reply in backend.timeout_s
    "invalid": ErrorCode.CLIENT_APP_RAISED_EXCEPTION,  # the reply failed fedkd.sim.replies' checks
}


@dataclass(frozen=True)
class NodeProfile:
    """What a device declares when it registers: never its battery or link, which change."""

    device_id: int
    device_class: str
    model_tier: str
    modalities: tuple[str, ...]
    fog: int | None = None  # the fog node it is attached to; None without a topology


class PopulationExhausted(RuntimeError):
    """The strategy waited longer than the scenario allows for enough devices."""


class SimulatedGrid(Grid):
    def __init__(self, executors: Grid, world: DeviceWorld, recorder: RoundRecorder, seed: int,
                 timeout_s: float, describe: Callable[[int], NodeProfile] | None = None,
                 topology: TopologySpec | None = None, num_classes: int | None = None,
                 state_store: DeviceStateStore | None = None):
        self.executors, self.world, self.recorder = executors, world, recorder
        self._describe, self.topology = describe, topology
        self.seed, self.timeout_s = seed, timeout_s
        self.num_classes = num_classes  # checks the shape of logit replies when given
        # Only devices that have state take room, on disk behind a bounded cache
        # (fedkd.sim.state_store); without a store given, a private temporary one.
        self.device_state = state_store if state_store is not None else DeviceStateStore()
        self._replies: dict[str, Message] = {}
        self._message_count = 0
        self._polls_since_send = 0
        self._last_poll_wall_s = 0.0
        self._waited_s = 0.0

    # -- Grid API ----------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self.executors.set_run(run)

    @property
    def run(self) -> Run:
        return self.executors.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        now_wall = time.monotonic()
        self._polls_since_send += 1
        # Flower's sample_nodes polls once a second while too few nodes are
        # online. Here, waiting costs simulated time: let devices come back.
        if self._polls_since_send > 2 and now_wall - self._last_poll_wall_s > 0.5:
            self._waited_s += self.world.spec.wait_step_s
            if self._waited_s > self.world.spec.max_wait_s:
                raise PopulationExhausted(
                    f"waited {self._waited_s:.0f} s of simulated time for devices; "
                    f"{len(self.world.available_ids())} online, "
                    f"{int((~self.world.alive()).sum())} with a flat battery")
            self.world.advance(self.world.spec.wait_step_s)
        self._last_poll_wall_s = now_wall
        # Flower samples with the global `random`: seed it here, right before the
        # strategy samples, so the same scenario and seed choose the same devices.
        random.seed(derive_seed(self.seed, "sample", self.recorder.current_round, self._polls_since_send))
        return self.world.available_ids().tolist()

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        self._polls_since_send, self._waited_s = 0, 0.0
        ids = []
        for message in messages:
            self._message_count += 1
            message.metadata.__dict__["_message_id"] = f"fedkd-{self._message_count}"
            ids.append(message.metadata.message_id)
        for reply in self._run_phase(messages):
            self._replies[reply.metadata.reply_to_message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        # Replies come back in device order, so aggregation sums in a fixed order.
        replies = self.pull_messages(self.push_messages(messages))
        return sorted(replies, key=lambda m: m.metadata.src_node_id)

    def node_profiles(self, node_ids: Iterable[int]) -> dict[int, NodeProfile]:
        """Each device's registration: class, model size, sensors (static facts,
        as a real server learns them when a device enrols). A fedkd extension of
        the Grid API for strategies that serve several architectures."""
        if self._describe is None:
            raise RuntimeError("this simulated grid was built without device profiles")
        return {n: self._describe(n) for n in node_ids}

    def telemetry(self) -> Telemetry:
        """The devices' last reports (stale and noisy as configured), never the truth
        or the future: what a resource-aware allocator may read. A fedkd extension."""
        return Telemetry(self.world)

    def backhaul(self, transfers: dict[int, tuple[int, int, float]]) -> float:
        """Fog -> cloud -> fog traffic of a fog-tier strategy: per fog, (bytes up to
        the cloud, bytes down from it, FLOPs the fog computes). The fogs work in
        parallel; the clock advances by the slowest. Returns that duration in s."""
        if self.topology is None:
            raise RuntimeError("this scenario has no topology: add `topology:` to use fog nodes")
        link = self.topology
        durations = [2 * link.latency_s + 8 * up / link.uplink_bps + flops / link.compute_flops
                     + 8 * down / link.downlink_bps for up, down, flops in transfers.values()]
        duration = max(durations, default=0.0)
        moved = sum(up + down for up, down, _ in transfers.values())
        self.world.advance(duration)
        self.recorder.record_backhaul(moved, moved * link.energy_per_byte_j)
        return duration

    # -- checkpoints (fedkd.checkpoint) -------------------------------------------
    def get_state(self) -> dict:
        """The counters later rounds depend on. The devices' state is not in it: the store
        commits each round's rows itself (``device_state.flush``, called before this), so a
        checkpoint only names the round (``state_round``) the store is rolled back to on resume."""
        return {"state_round": self.device_state.flushed_round, "message_count": self._message_count,
                "polls_since_send": self._polls_since_send, "waited_s": self._waited_s}

    def set_state(self, state: dict) -> None:
        if "device_state" in state:  # a checkpoint written before the store: the states travel in it
            for device, device_state in sorted(state["device_state"].items()):
                self.device_state.put(device, device_state)
        else:
            self.device_state.rollback(state["state_round"])
        self._message_count, self._polls_since_send = state["message_count"], state["polls_since_send"]
        self._waited_s = state["waited_s"]

    # -- the simulated world -----------------------------------------------------
    def _run_phase(self, messages: list[Message]) -> list[Message]:
        if not messages:
            return []
        world, server_round = self.world, self.recorder.current_round
        alive, unreachable, sent = world.alive(), {}, {}
        for message in messages:
            device = message.metadata.dst_node_id
            if not 0 <= device < world.population.size:
                raise ValueError(f"message addressed to node {device}, which is not a device of this "
                                 f"population (0..{world.population.size - 1})")
            if device in sent or device in unreachable:
                raise ValueError(f"two messages for device {device} in one phase")
            if not alive[device]:
                unreachable[device] = "battery"
            elif not world.online[device]:
                unreachable[device] = "offline"
            else:
                sent[device] = message
        replies = self._execute(sent, server_round)
        costs, details = [], {}
        # Strategies often send one content object to every device (FedAvg does): size it once.
        sized: dict[int, tuple[int, list[int]]] = {}
        for device, message in sent.items():
            reply = replies.get(device)
            problem = None if reply is None or reply.has_error() else reply_problem(message, reply, self.num_classes)
            if reply is None or reply.has_error() or problem:
                unreachable[device], details[device] = _failure(reply, problem, self.timeout_s)
            else:
                key = id(message.content)
                if key not in sized:
                    sized[key] = (payload_bytes(message.content), _d2d_messages(message.content))
                down_bytes, d2d_in = sized[key]
                d2d_out = _d2d_messages(reply.content)
                fanout = int(message.content[D2D_ROUTE]["fanout"]) if D2D_ROUTE in message.content else 1
                costs.append(TaskCost(device, down_bytes - sum(d2d_in),
                                      reported_flops(reply.content), payload_bytes(reply.content) - sum(d2d_out),
                                      sum(d2d_in), len(d2d_in), fanout * sum(d2d_out), fanout * len(d2d_out)))
        # An invalid reply arrives at once: the world times it as an error reply.
        outcomes = world.run_phase(costs, {d: "error" if r == "invalid" else r for d, r in unreachable.items()})
        outcomes = [replace(o, reason="invalid") if unreachable.get(o.device_id) == "invalid" else o for o in outcomes]
        self._count_d2d(outcomes)
        phase = messages[0].metadata.message_type.split(".")[0]
        self.recorder.record_phase(phase, outcomes, details)
        by_device = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for o in outcomes:
            original = by_device[o.device_id]
            if o.status == OK:
                content = replies[o.device_id].content
                if STATE in content:
                    self.device_state.round = server_round  # the round that wrote it: see rollback
                    self.device_state.put(o.device_id, content[STATE])
                out.append(Message(strategy_view(content), reply_to=original))
            else:
                detail = details.get(o.device_id, "") if o.reason in ("error", "invalid", "timeout") else ""
                error = Error(ERROR_CODES[o.reason], f"fedkd: {o.reason}" + (f": {detail}" if detail else ""))
                out.append(Message(error, reply_to=original))
        return out

    def _count_d2d(self, outcomes: list[TaskOutcome]) -> None:
        moved = sum(o.d2d_bytes_out for o in outcomes)
        if moved or any(o.d2d_bytes_in for o in outcomes):
            self.recorder.record_d2d(moved, sum(o.d2d_energy_j for o in outcomes))

    def _execute(self, sent: dict[int, Message], server_round: int) -> dict[int, Message]:
        """Run each device's task on an executor node; returns replies by device."""
        if not sent:
            return {}
        executors = sorted(self.executors.get_node_ids())
        inner_to_device, inner = {}, []
        for i, (device, message) in enumerate(sorted(sent.items())):
            content = with_task(message.content, device, server_round, self.seed)
            state = self.device_state.get(device)
            if state is not None:
                content[STATE] = state
            task = Message(content, executors[i % len(executors)], message.metadata.message_type,
                           group_id=str(server_round))
            inner.append((device, task))
        replies = self.executors.send_and_receive([t for _, t in inner], timeout=self.timeout_s)
        for device, task in inner:
            inner_to_device[task.metadata.message_id] = device
        return {inner_to_device[r.metadata.reply_to_message_id]: r for r in replies
                if r.metadata.reply_to_message_id in inner_to_device}


def _d2d_messages(content: RecordDict) -> list[int]:
    """Bytes of each device-to-device record of ``content``, one message each."""
    return [payload_bytes(RecordDict({key: record})) for key, record in content.items()
            if key.startswith(D2D_PREFIX)]


def _failure(reply: Message | None, problem: str | None, timeout_s: float) -> tuple[str, str]:
    """(reason, detail) of a task whose reply is missing, an error, or fails the checks."""
    if reply is None:  # the backend gave up waiting (Flower's grids drop such replies)
        return "timeout", f"no reply within {timeout_s:g} s"
    if problem:
        return "invalid", problem
    timed_out = reply.error.code == ERROR_CODES["timeout"]
    return ("timeout" if timed_out else "error"), reply.error.reason
