"""The SimPy world: a virtual clock, device availability, link and compute
quality, batteries, and the timeline of every task a strategy sends.

Between tasks the whole population evolves in closed form, vectorised over
devices: availability is a two-state continuous-time Markov chain (mean online
and offline durations per device class), link/compute quality a Markov chain
over the class's quality states (:mod:`fedkd.sim.quality`), batteries charge
(constant trickle, charging windows, solar by time of day:
:mod:`fedkd.sim.charging`) and idle-drain. A class with a trace replays the
traced quantities instead (:mod:`fedkd.sim.traces`). Spans are cut where the
charge power changes its course (a window opens, the sun peaks), so batteries
clip at full or empty where they should; batteries are also cut where a
class's charge power crosses its idle draw, so each one's course is monotone
between cuts. Telemetry heartbeats inside a span see a state drawn from a
Markov bridge between its ends, so reporting never changes the world's path.

During a phase (one ``send_and_receive``) every chosen device runs as a SimPy
process: downlink of the real payload bytes, compute of the measured FLOPs,
uplink of the real reply bytes, at the device's speed when the task starts
(class mean x quality state x hour-of-day factor, or the traced value) with
log-normal jitter per device and round. A device that goes offline or whose
battery runs out mid-task fails at that moment; one still busy at the round
deadline aborts there and fails with ``deadline``. A device that completes a
task reports its state (:mod:`fedkd.sim.telemetry`).

A task may also move bytes over the device-to-device (D2D) radio: it first
receives its neighbours' messages, last sends its own to each neighbour, at
the class's ``d2d_bps`` (with the task's downlink / uplink jitter) and
``d2d_latency_s`` per message; a class without a D2D radio of its own uses its
downlink to receive and its uplink to send. A leg that moves no bytes is not
run, so a task that uses only the D2D radio never touches the server link.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import simpy

from ..scenario import WorldSpec
from ..seeding import hashed_uniform, rng_for
from .charging import HOUR_S, ChargeProfile
from .population import Population
from .quality import QualityChains
from .telemetry import ReportLog
from .traces import TraceReplay

OK, FAILED = "ok", "failed"


@dataclass(frozen=True)
class TaskCost:
    """What one task moves and computes; known once the device has replied."""

    device_id: int
    bytes_down: int
    flops: float
    bytes_up: int
    d2d_bytes_in: int = 0  # received from neighbours over the D2D radio
    d2d_messages_in: int = 0
    d2d_bytes_out: int = 0  # sent to neighbours: each message once per neighbour
    d2d_messages_out: int = 0


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
    d2d_bytes_in: int = 0
    d2d_bytes_out: int = 0
    d2d_energy_j: float = 0.0  # the part of energy_j spent on the D2D radio


@dataclass(frozen=True)
class _Stage:
    name: str
    duration_s: float
    energy_j: float
    bytes_down: int = 0
    bytes_up: int = 0
    d2d_in: int = 0
    d2d_out: int = 0


class DeviceWorld:
    def __init__(self, population: Population, spec: WorldSpec, seed: int):
        self.population, self.spec, self.seed = population, spec, seed
        classes = population.classes
        ids = np.arange(population.size)
        self.class_index = population.class_index(ids)
        col = lambda name, missing=np.inf: population.column(name, self.class_index, missing)  # noqa: E731
        self.capacity_j = col("battery_j")
        charge = hashed_uniform(ids, seed, "initial-charge")
        floor = col("initial_charge_min", 1.0)
        self.battery_j = np.where(np.isinf(self.capacity_j), np.inf,
                                  self.capacity_j * (floor + (1 - floor) * charge))
        self.mean_online_s = np.array([c.availability.mean_online_s for c in classes])[self.class_index]
        self.mean_offline_s = np.array([c.availability.mean_offline_s for c in classes])[self.class_index]
        stationary_online = self.mean_online_s / (self.mean_online_s + self.mean_offline_s)
        self.online = hashed_uniform(ids, seed, "online", 0) < stationary_online
        self.idle_w = col("idle_power_w", 0.0)
        self.uplink_bps, self.downlink_bps = col("uplink_bps"), col("downlink_bps")
        self.compute_flops = col("compute_flops")
        # NaN: the class has no D2D radio of its own (see _task_rates and _stages).
        self.d2d_bps, self.d2d_latency_s = col("d2d_bps", np.nan), col("d2d_latency_s", np.nan)
        self.energy_per_byte_d2d_j = col("energy_per_byte_d2d_j", np.nan)
        self.charge = [ChargeProfile(c, spec.start_hour) for c in classes]
        self.quality = QualityChains(classes, self.class_index, seed)
        # Hour-of-day multipliers, one row of 24 per class.
        self.diurnal_bandwidth = np.array([(c.diurnal and c.diurnal.bandwidth_factor) or [1.0] * 24 for c in classes])
        self.diurnal_compute = np.array([(c.diurnal and c.diurnal.compute_factor) or [1.0] * 24 for c in classes])
        self.traces = TraceReplay([c.trace for c in classes], self.class_index)
        self.traces.set_online(self.online, 0.0)  # a replayed trace is the truth from the start
        self.env = simpy.Environment()
        self._steps = 0  # how many times the population has been advanced; seeds its draws
        self._round_start_s = 0.0  # when the round in progress started (WorldSpec.round_interval_s)
        # A device whose battery ran flat stays down until it has recharged to
        # `revive_fraction` of its capacity, as a power manager's brown-out
        # threshold would keep it (else it would bounce back on a trickle).
        self.flat = np.zeros(population.size, dtype=bool)
        self.reports = ReportLog(population.size, spec.telemetry, seed)
        self._report(ids, 0.0, self.online)  # every device enrolls with its state at time 0

    @property
    def now_s(self) -> float:
        return float(self.env.now)

    def hour_of_day(self, t_s: float) -> float:
        return (self.spec.start_hour + t_s / HOUR_S) % 24

    def alive(self) -> np.ndarray:
        return ~self.flat & (self.battery_j > self.spec.battery_floor_j)

    def available_ids(self) -> np.ndarray:
        return np.flatnonzero(self.online & self.alive())

    def round_closed(self, server_round: int) -> None:
        """A round has closed now: the next one starts at once, or, with ``round_interval_s``, at
        this round's start plus the interval if that is later; the devices idle (drain, charge,
        come and go) until then, in closed form. Round 0, the scoring of the initial model, runs
        no task and takes no time: round 1 starts at the clock's start.
        """
        interval = self.spec.round_interval_s
        if interval is not None and server_round > 0:
            self.advance(self._round_start_s + interval - self.now_s)  # nothing if the round overran
        self._round_start_s = self.now_s

    def battery_snapshot(self) -> dict[str, float]:
        """Mean and lowest charge of each battery-powered class now, over all its devices.

        Keys ``battery_mean_j_<class>`` and ``battery_min_j_<class>``: meant for a
        round's metrics, from which the report draws battery trajectories.
        """
        out = {}
        for k, c in enumerate(self.population.classes):
            charge = self.battery_j[self.class_index == k]
            if c.battery_j is not None and len(charge):
                out[f"battery_mean_j_{c.name}"] = float(charge.mean())
                out[f"battery_min_j_{c.name}"] = float(charge.min())
        return out

    def get_state(self) -> dict:
        """What changes as the world runs, for checkpoints (fedkd.checkpoint); the rest
        follows from the scenario. Between phases no SimPy event is pending, so the
        clock's time is all of the environment there is to keep."""
        return {"now_s": self.env.now, "steps": self._steps, "round_start_s": self._round_start_s,
                "battery_j": self.battery_j.copy(),
                "online": self.online.copy(), "flat": self.flat.copy(), "quality": self.quality.get_state(),
                "reports": self.reports.get_state()}

    def set_state(self, state: dict) -> None:
        self.env = simpy.Environment(initial_time=state["now_s"])
        self._steps = int(state["steps"])
        # .get: a checkpoint from before schedules existed was saved at a round's end = the next start.
        self._round_start_s = float(state.get("round_start_s", state["now_s"]))
        self.battery_j = np.array(state["battery_j"], dtype=np.float64)
        self.online = np.array(state["online"], dtype=bool)
        self.flat = np.array(state["flat"], dtype=bool)
        self.quality.set_state(state["quality"])
        self.reports.set_state(state["reports"])

    def expected_rates(self, ids: np.ndarray, t_s: float,
                       quality: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uplink_bps, downlink_bps, compute_flops) of devices ``ids`` at ``t_s``, before jitter
        (in quality states ``quality``, by default the current ones)."""
        ids = np.asarray(ids, dtype=np.int64)
        k, hour = self.class_index[ids], min(int(self.hour_of_day(t_s)), 23)
        bandwidth = self.quality.bandwidth_factor(ids, quality) * self.diurnal_bandwidth[k, hour]
        rates = {"uplink_bps": self.uplink_bps[ids] * bandwidth, "downlink_bps": self.downlink_bps[ids] * bandwidth,
                 "compute_flops": self.compute_flops[ids] * self.quality.compute_factor(ids, quality)
                 * self.diurnal_compute[k, hour]}
        self.traces.set_rates(ids, t_s, rates)
        return rates["uplink_bps"], rates["downlink_bps"], rates["compute_flops"]

    def advance(self, duration_s: float) -> None:
        """Let ``duration_s`` of simulated time pass with no task running."""
        if duration_s > 0:
            self._steps += 1
            start = self.now_s
            self.env.run(until=self.env.now + duration_s)
            self._evolve(start, self.now_s, np.ones(len(self.online), dtype=bool))

    def _evolve(self, start_s: float, end_s: float, who: np.ndarray) -> None:
        """Closed-form evolution over [start_s, end_s]: availability and quality of the
        devices in mask ``who``, batteries of all; heartbeats at report times."""
        cuts = {t for p in self.charge if p.varies for t in p.breakpoints_s(start_s, end_s)}
        cuts |= self.traces.charge_changes_s(start_s, end_s)
        ticks = self._report_ticks(start_s, end_s)
        piece_start = start_s
        for piece, piece_end in enumerate(sorted(cuts | {end_s})):
            # The first piece's draws are keyed as before pieces existed, so worlds
            # without time-of-day effects give the same numbers.
            key = (self._steps,) if piece == 0 else (self._steps, piece)
            before = (self.online.copy(), self.quality.state.copy(), self.battery_j.copy(), self.flat.copy())
            self._evolve_piece(piece_start, piece_end, who, key)
            mine = [t for t in ticks if piece_start < t <= piece_end]
            if mine:
                self._heartbeats(piece_start, piece_end, mine, before, who, key)
            piece_start = piece_end

    def _report_ticks(self, start_s: float, end_s: float) -> list[float]:
        interval = self.spec.telemetry.report_interval_s
        if interval is None:
            return []
        first, last = int(np.floor(start_s / interval)) + 1, int(np.floor(end_s / interval))
        return [k * interval for k in range(first, last + 1)]

    def _p_online(self, was_online: np.ndarray, span_s: float) -> np.ndarray:
        # Exact transition of a two-state CTMC over span_s:
        # P(on | was on) = pi + (1 - pi) e^{-rt}, P(on | was off) = pi (1 - e^{-rt}).
        rate = 1 / self.mean_online_s + 1 / self.mean_offline_s
        pi = self.mean_online_s / (self.mean_online_s + self.mean_offline_s)
        decay = np.exp(-rate * span_s)
        return np.where(was_online, pi + (1 - pi) * decay, pi * (1 - decay))

    def _evolve_piece(self, start_s: float, end_s: float, who: np.ndarray, key: tuple) -> None:
        span_s = end_s - start_s
        draw = hashed_uniform(np.arange(len(self.online)), self.seed, "online", *key)
        self.online = np.where(who, draw < self._p_online(self.online, span_s), self.online)
        self.traces.set_online(self.online, end_s)  # the truth for every device that replays it, busy or not
        self.quality.evolve(span_s, who, *key)
        self.battery_j, self.flat = self._battery_after(self.battery_j, self.flat, start_s, end_s)

    def _battery_after(self, battery_j: np.ndarray, flat: np.ndarray, start_s: float,
                       end_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Batteries and flat flags at ``end_s``, from ``battery_j`` and ``flat`` at ``start_s``.

        Cut where some class's charge power changes course (the callers' pieces already are)
        and where its net power (charge minus idle draw) changes sign, so that each battery is
        monotone over each piece and clipping at the ends is exact (a battery that runs flat
        before sunrise stays at zero, rather than borrowing the morning's sun).
        """
        cuts = {t for p, c in zip(self.charge, self.population.classes) if p.varies
                for t in (*p.breakpoints_s(start_s, end_s), *p.net_sign_changes_s(c.idle_power_w, start_s, end_s))}
        piece_start = start_s
        for piece_end in sorted(cuts | {end_s}):
            battery_j, flat = self._battery_piece(battery_j, flat, piece_start, piece_end)
            piece_start = piece_end
        return battery_j, flat

    def _battery_piece(self, battery_j: np.ndarray, flat: np.ndarray, start_s: float,
                       end_s: float) -> tuple[np.ndarray, np.ndarray]:
        charge_j = np.array([p.energy_j(start_s, end_s) for p in self.charge])[self.class_index]
        self.traces.set_charge_j(charge_j, start_s, end_s)
        finite = np.isfinite(self.capacity_j)
        battery_j = battery_j.copy()
        net_j = charge_j - self.idle_w * (end_s - start_s)
        battery_j[finite] = np.clip(battery_j[finite] + net_j[finite], 0.0, self.capacity_j[finite])
        flat = (flat | (battery_j <= self.spec.battery_floor_j)) & ~(battery_j >= self.spec.revive_fraction
                                                                      * self.capacity_j)
        return battery_j, flat

    def _heartbeats(self, start_s: float, end_s: float, ticks: list[float], before: tuple,
                    who: np.ndarray, key: tuple) -> None:
        """Reports of idle online devices at ``ticks`` inside a piece that has already been evolved.

        The state at a tick is drawn from a Markov bridge between the piece's two
        ends, with draws of its own: the world's path is the same whether or not
        anyone reports.
        """
        online, quality, battery_j, flat = before
        ids = np.arange(len(online))
        previous_s = start_s
        for i, tick in enumerate(ticks):
            if tick >= end_s:  # a report at the piece's end sees the world's own state
                online, quality, battery_j, flat = self.online, self.quality.state, self.battery_j, self.flat
            else:
                into, rest = tick - previous_s, end_s - tick
                # P(on at tick | before, end) is proportional to P(before -> on) P(on -> end).
                on_stays_on = self._p_online(np.ones_like(online), rest)
                off_turns_on = self._p_online(np.zeros_like(online), rest)
                on_to_end = np.where(self.online, on_stays_on, 1 - on_stays_on)
                off_to_end = np.where(self.online, off_turns_on, 1 - off_turns_on)
                p_on = self._p_online(online, into)
                w_on, w_off = p_on * on_to_end, (1 - p_on) * off_to_end
                draw = hashed_uniform(ids, self.seed, "online-bridge", *key, i)
                online = np.where(who, draw * (w_on + w_off) < w_on, online)
                bridged = self.quality.bridge(quality, self.quality.state, into, end_s - previous_s, *key, i)
                quality = np.where(who, bridged, quality)
                self.traces.set_online(online, tick)
                battery_j, flat = self._battery_after(battery_j, flat, previous_s, tick)
            alive = ~flat & (battery_j > self.spec.battery_floor_j)
            reporting = np.flatnonzero(who & online & alive)
            up, down, flops = self.expected_rates(reporting, tick, quality)
            self.reports.record(reporting, tick, True, battery_j=battery_j[reporting], uplink_bps=up,
                                downlink_bps=down, compute_flops=flops)
            previous_s = tick

    def _report(self, ids: np.ndarray, t_s: float, online) -> None:
        up, down, flops = self.expected_rates(ids, t_s)
        self.reports.record(ids, t_s, online if np.ndim(online) == 0 else online[ids],
                            battery_j=self.battery_j[ids], uplink_bps=up, downlink_bps=down,
                            compute_flops=flops)

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
        self._evolve(start, self.now_s, idle)
        return [outcomes[k] for k in sorted(outcomes)]

    def _task_rates(self, device: int, rng: np.random.Generator) -> tuple[float, float, float, float, float]:
        """(compute FLOP/s, downlink bps, uplink bps, D2D receive bps, D2D send bps) for this
        task: expected rates with jitter; a replayed quantity is taken as measured, without jitter."""
        up, down, flops = (float(x[0]) for x in self.expected_rates(np.array([device]), self.now_s))
        c = self.population.classes[self.class_index[device]]
        # Three draws in a fixed order, used or not, so each task's stream stays the same.
        jitter = np.exp(c.jitter_sigma * rng.standard_normal(3))
        replayed = lambda column: self.traces.replayed(device, column)  # noqa: E731
        down = down if replayed("downlink_bps") else down * jitter[1]
        up = up if replayed("uplink_bps") else up * jitter[2]
        # The D2D radio shares the link's luck (jitter) in each direction, not its
        # quality states or hour-of-day factors, which model the operator's network.
        d2d = self.d2d_bps[device]
        d2d_in, d2d_out = (down, up) if np.isnan(d2d) else (d2d * jitter[1], d2d * jitter[2])
        return (flops if replayed("compute_flops") else flops * jitter[0], down, up, d2d_in, d2d_out)

    def _stages(self, cost: TaskCost, speed_flops: float, down_bps: float, up_bps: float,
                d2d_in_bps: float, d2d_out_bps: float) -> list[_Stage]:
        device = cost.device_id
        c = self.population.classes[self.class_index[device]]
        d2d_latency_s = self.d2d_latency_s[device]
        d2d_latency_s = c.latency_s if np.isnan(d2d_latency_s) else d2d_latency_s
        d2d_j = self.energy_per_byte_d2d_j[device]
        d2d_in_j, d2d_out_j = (c.energy_per_byte_down_j, c.energy_per_byte_up_j) if np.isnan(d2d_j) else (d2d_j, d2d_j)
        stages = [
            _Stage("downlink", c.latency_s + 8 * cost.bytes_down / down_bps,
                   cost.bytes_down * c.energy_per_byte_down_j, bytes_down=cost.bytes_down),
            _Stage("d2d_receive", cost.d2d_messages_in * d2d_latency_s + 8 * cost.d2d_bytes_in / d2d_in_bps,
                   cost.d2d_bytes_in * d2d_in_j, d2d_in=cost.d2d_bytes_in),
            _Stage("compute", cost.flops / speed_flops, cost.flops * c.energy_per_flop_j),
            _Stage("d2d_send", cost.d2d_messages_out * d2d_latency_s + 8 * cost.d2d_bytes_out / d2d_out_bps,
                   cost.d2d_bytes_out * d2d_out_j, d2d_out=cost.d2d_bytes_out),
            _Stage("uplink", c.latency_s + 8 * cost.bytes_up / up_bps,
                   cost.bytes_up * c.energy_per_byte_up_j, bytes_up=cost.bytes_up),
        ]
        # A leg with nothing to move is not a leg: no message, no latency.
        legs = {"downlink": cost.bytes_down, "d2d_receive": cost.d2d_messages_in,
                "d2d_send": cost.d2d_messages_out, "uplink": cost.bytes_up}
        return [s for s in stages if legs.get(s.name, 1)]

    def _online_left_s(self, device: int, rng: np.random.Generator) -> float:
        # Online time left is exponential (memoryless chain), drawn once per task;
        # a replayed trace says exactly when the device next goes offline.
        drawn = rng.exponential(self.mean_online_s[device])
        replayed = self.traces.next_offline_s(device, self.now_s)
        return drawn if replayed is None else replayed - self.now_s

    def _task(self, cost: TaskCost, outcomes: dict[int, TaskOutcome]):
        """One device's task as a SimPy process."""
        device = cost.device_id
        rng = rng_for(self.seed, "task", device, self._steps)
        rates = self._task_rates(device, rng)
        stages = self._stages(cost, *rates)
        online_left_s = self._online_left_s(device, rng)
        deadline_s = self.spec.round_deadline_s
        start = self.env.now
        spent_j, moved_down, moved_up, reason = 0.0, 0, 0, ""
        d2d_in, d2d_out, d2d_j = 0, 0, 0.0
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
            d2d_in += int(stage.d2d_in * done)
            d2d_out += int(stage.d2d_out * done)
            if stage.d2d_in or stage.d2d_out:
                d2d_j += used_j
            if reason:
                break
        if reason == "offline":
            self.online[device] = False
        if reason == "battery":
            self.flat[device] = True
        if not reason:
            # The reply carries the device's report: its battery now and the rates it achieved.
            speed_flops, down_bps, up_bps = rates[:3]
            self.reports.record(np.array([device]), self.env.now, True, battery_j=self.battery_j[device],
                                uplink_bps=up_bps, downlink_bps=down_bps, compute_flops=speed_flops)
        outcomes[device] = TaskOutcome(device, FAILED if reason else OK, reason, start, self.env.now,
                                       moved_down, moved_up, spent_j, float(self.battery_j[device]),
                                       d2d_in, d2d_out, d2d_j)
