"""The SimPy world: a virtual clock, device availability and batteries, and the
timeline of every task a strategy sends.

Between tasks the whole population evolves in closed form, vectorised over
devices: availability is a two-state continuous-time Markov chain (mean online
and offline durations per device class), batteries recharge and idle-drain.
During a phase (one ``send_and_receive``) every chosen device runs as a SimPy
process: downlink of the real payload bytes, compute of the measured FLOPs,
uplink of the real reply bytes, each at this round's speed and bandwidth
(log-normal jitter per device and round). A device that goes offline or whose
battery runs out mid-task fails at that moment; one still busy at the round
deadline aborts there and fails with ``deadline``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from ..scenario import WorldSpec
from ..seeding import hashed_uniform, rng_for
from .population import Population

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class TaskCost:
    """What one task moves and computes; known once the device has replied."""

    device_id: int
    bytes_down: int
    flops: float
    bytes_up: int


@dataclass
class TaskOutcome:
    device_id: int
    status: str  # OK or FAILED
    reason: str  # "" when ok; deadline | battery | offline | error
    start_s: float
    end_s: float
    bytes_down: int
    bytes_up: int
    energy_j: float
    battery_j: float  # charge left after the task


@dataclass(frozen=True)
class _Stage:
    name: str
    duration_s: float
    energy_j: float
    bytes_down: int = 0
    bytes_up: int = 0


class DeviceWorld:
    def __init__(self, population: Population, spec: WorldSpec, seed: int):
        self.population, self.spec, self.seed = population, spec, seed
        ids = np.arange(population.size)
        self.class_index = population.class_index(ids)
        col = lambda name, missing=np.inf: population.column(name, self.class_index, missing)  # noqa: E731
        self.capacity_j = col("battery_j")
        charge = hashed_uniform(ids, seed, "initial-charge")
        floor = col("initial_charge_min", 1.0)
        self.battery_j = np.where(np.isinf(self.capacity_j), np.inf,
                                  self.capacity_j * (floor + (1 - floor) * charge))
        self.mean_online_s = np.array([c.availability.mean_online_s for c in population.classes])[self.class_index]
        self.mean_offline_s = np.array([c.availability.mean_offline_s for c in population.classes])[self.class_index]
        stationary_online = self.mean_online_s / (self.mean_online_s + self.mean_offline_s)
        self.online = hashed_uniform(ids, seed, "online", 0) < stationary_online
        self.recharge_w = col("recharge_power_w", 0.0)
        self.idle_w = col("idle_power_w", 0.0)
        self.env = simpy.Environment()
        self._steps = 0  # how many times the population has been advanced; seeds its draws
        # A device whose battery ran flat stays down until it has recharged to
        # `revive_fraction` of its capacity, as a power manager's brown-out
        # threshold would keep it (else it would bounce back on a trickle).
        self.flat = np.zeros(population.size, dtype=bool)

    @property
    def now_s(self) -> float:
        return float(self.env.now)

    def alive(self) -> np.ndarray:
        return ~self.flat & (self.battery_j > self.spec.battery_floor_j)

    def available_ids(self) -> np.ndarray:
        return np.flatnonzero(self.online & self.alive())

    def advance(self, duration_s: float) -> None:
        """Let ``duration_s`` of simulated time pass with no task running."""
        if duration_s > 0:
            self._steps += 1
            self.env.run(until=self.env.now + duration_s)
            self._evolve(duration_s, np.ones(len(self.online), dtype=bool))

    def _evolve(self, span_s: float, who: np.ndarray) -> None:
        """Closed-form evolution of the devices in mask ``who`` over ``span_s``."""
        # Exact transition of a two-state CTMC over span_s:
        # P(on | was on) = pi + (1 - pi) e^{-rt}, P(on | was off) = pi (1 - e^{-rt}).
        rate = 1 / self.mean_online_s + 1 / self.mean_offline_s
        pi = self.mean_online_s / (self.mean_online_s + self.mean_offline_s)
        decay = np.exp(-rate * span_s)
        p_on = np.where(self.online, pi + (1 - pi) * decay, pi * (1 - decay))
        draw = hashed_uniform(np.arange(len(self.online)), self.seed, "online", self._steps)
        self.online = np.where(who, draw < p_on, self.online)
        finite = np.isfinite(self.capacity_j)
        net_j = (self.recharge_w - self.idle_w) * span_s
        self.battery_j[finite] = np.clip(self.battery_j[finite] + net_j[finite], 0.0, self.capacity_j[finite])
        self.flat |= self.battery_j <= self.spec.battery_floor_j
        self.flat &= ~(self.battery_j >= self.spec.revive_fraction * self.capacity_j)

    def run_phase(self, costs: list[TaskCost], unreachable: dict[int, str]) -> list[TaskOutcome]:
        """Run one phase: all tasks start now; the clock moves to the phase's end.

        ``unreachable`` maps device ids whose task never ran to the reason:
        ``error`` (the client raised: its error reply arrives at once) or
        ``offline`` / ``battery`` (no reply ever comes). Devices abort at the
        deadline, as a task's TTL tells them to. The phase ends when the last
        reply arrives, or at the deadline if some reply never comes.
        """
        self._steps += 1
        start = self.now_s
        outcomes: dict[int, TaskOutcome] = {
            d: TaskOutcome(d, FAILED, reason, start, start, 0, 0, 0.0, float(self.battery_j[d]))
            for d, reason in unreachable.items()
        }
        self.env.run(until=self.env.all_of([self.env.process(self._task(c, outcomes)) for c in costs]))
        silent = any(o.status == FAILED and o.reason != "error" for o in outcomes.values())
        if silent and self.env.now < start + self.spec.round_deadline_s:
            self.env.run(until=start + self.spec.round_deadline_s)
        idle = np.ones(len(self.online), dtype=bool)
        idle[list(outcomes)] = False
        self._evolve(self.now_s - start, idle)
        return [outcomes[k] for k in sorted(outcomes)]

    def _stages(self, cost: TaskCost, rng: np.random.Generator) -> list[_Stage]:
        c = self.population.classes[self.class_index[cost.device_id]]
        speed_flops = c.compute_flops * np.exp(c.jitter_sigma * rng.standard_normal())
        down_bps = c.downlink_bps * np.exp(c.jitter_sigma * rng.standard_normal())
        up_bps = c.uplink_bps * np.exp(c.jitter_sigma * rng.standard_normal())
        return [
            _Stage("downlink", c.latency_s + 8 * cost.bytes_down / down_bps,
                   cost.bytes_down * c.energy_per_byte_down_j, bytes_down=cost.bytes_down),
            _Stage("compute", cost.flops / speed_flops, cost.flops * c.energy_per_flop_j),
            _Stage("uplink", c.latency_s + 8 * cost.bytes_up / up_bps,
                   cost.bytes_up * c.energy_per_byte_up_j, bytes_up=cost.bytes_up),
        ]

    def _task(self, cost: TaskCost, outcomes: dict[int, TaskOutcome]):
        """One device's task as a SimPy process."""
        device = cost.device_id
        rng = rng_for(self.seed, "task", device, self._steps)
        stages = self._stages(cost, rng)
        # Online time left is exponential (memoryless chain), drawn once per task.
        online_left_s = rng.exponential(self.mean_online_s[device])
        deadline_s = self.spec.round_deadline_s
        start = self.env.now
        spent_j, moved_down, moved_up, reason = 0.0, 0, 0, ""
        for stage in stages:
            elapsed = self.env.now - start
            charge_j = max(self.battery_j[device] - self.spec.battery_floor_j, 0.0)
            # Each way the stage can be cut short, as (seconds into the stage, reason);
            # the earliest one happens.
            cuts = []
            if stage.energy_j > charge_j:
                cuts.append((stage.duration_s * charge_j / stage.energy_j, "battery"))
            if elapsed + stage.duration_s > online_left_s:
                cuts.append((max(online_left_s - elapsed, 0.0), "offline"))
            if elapsed + stage.duration_s > deadline_s:
                cuts.append((max(deadline_s - elapsed, 0.0), "deadline"))
            run_s, reason = min(cuts, default=(stage.duration_s, ""))
            done = run_s / stage.duration_s if stage.duration_s > 0 else float(not reason)
            yield self.env.timeout(run_s)
            used_j = charge_j if reason == "battery" else stage.energy_j * done
            self.battery_j[device] -= used_j
            spent_j += used_j
            moved_down += int(stage.bytes_down * done)
            moved_up += int(stage.bytes_up * done)
            if reason:
                break
        if reason == "offline":
            self.online[device] = False
        if reason == "battery":
            self.flat[device] = True
        outcomes[device] = TaskOutcome(device, FAILED if reason else OK, reason, start, self.env.now,
                                       moved_down, moved_up, spent_j, float(self.battery_j[device]))
