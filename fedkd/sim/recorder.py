"""Collects what the simulated grid observes, round by round."""
from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np

from ..results import DeviceRecord, RoundRecord, StrategyRun
from .world import OK, DeviceWorld, TaskOutcome


TASK_ERRORS = ("error", "invalid")  # reasons that come from the device's code, not from the world


class RoundRecorder:
    def __init__(self, label: str, strategy: str, world: DeviceWorld):
        self.world = world
        self.run = StrategyRun(label=label, strategy=strategy)
        self._pending: list[DeviceRecord] = []
        self._backhaul_bytes, self._backhaul_energy_j = 0, 0.0
        self._d2d: dict[str, float] | None = None  # the open round's device-to-device traffic

    @property
    def current_round(self) -> int:
        """The round in progress: rounds are closed by the server's evaluation."""
        return len(self.run.rounds)

    def record_phase(self, phase: str, outcomes: list[TaskOutcome], details: dict[int, str] | None = None) -> None:
        """The phase's device rows; ``details``: what a failed task's reply said, by device."""
        classes = self.world.population.classes
        for o in outcomes:
            if o.reason in TASK_ERRORS:
                if not self.run.device_task_errors:
                    said = " ".join(((details or {}).get(o.device_id) or o.reason).split())  # one line
                    said = said if len(said) <= 300 else said[:299] + "…"
                    self.run.first_device_task_error = f"round {self.current_round}, device {o.device_id} ({phase}): {said}"
                self.run.device_task_errors += 1
            self._pending.append(DeviceRecord(
                self.run.label, self.current_round, phase, o.device_id,
                classes[self.world.class_index[o.device_id]].name, o.status, o.reason,
                o.start_s, o.end_s, o.bytes_down, o.bytes_up, o.energy_j, o.battery_j))

    def pending_trained(self) -> list[int]:
        """Devices whose training task of the open round succeeded."""
        return [t.device_id for t in self._pending if t.phase == "train" and t.status == OK]

    def record_backhaul(self, moved_bytes: int, energy_j: float) -> None:
        self._backhaul_bytes += moved_bytes
        self._backhaul_energy_j += energy_j

    def record_d2d(self, moved_bytes: float, energy_j: float) -> None:
        """Device-to-device traffic of the open round: bytes sent (each copy counted), both radios' energy."""
        usage = self._d2d if self._d2d is not None else {"d2d_bytes": 0.0, "d2d_energy_j": 0.0}
        usage["d2d_bytes"] += moved_bytes
        usage["d2d_energy_j"] += energy_j
        self._d2d = usage

    def close_round(self, server_round: int, accuracy: float, metrics: dict[str, float]) -> RoundRecord:
        tasks = self._pending
        alive = self.world.alive()
        record = RoundRecord(
            strategy=self.run.label, round=server_round, sim_time_s=self.world.now_s,
            accuracy=accuracy,
            bytes_up=sum(t.bytes_up for t in tasks), bytes_down=sum(t.bytes_down for t in tasks),
            energy_j=sum(t.energy_j for t in tasks),
            participants=sum(t.status == OK and t.phase == "train" for t in tasks),
            dropped=sum(t.status != OK for t in tasks),
            available_devices=int((self.world.online & alive).sum()),
            dead_devices=int((~alive).sum()),
            metrics={**metrics, **(self._d2d or {}), **self.world.battery_snapshot(), **self._backhaul()},
        )
        self.run.rounds.append(record)
        self.run.devices.extend(tasks)
        self.world.round_closed(server_round)  # on a schedule, the clock moves on to the next round's start
        self._pending = []
        self._backhaul_bytes, self._backhaul_energy_j = 0, 0.0
        self._d2d = None
        return record

    def _backhaul(self) -> dict[str, float]:
        # Only fog-tier strategies move backhaul traffic; others get no such columns.
        if not self._backhaul_bytes:
            return {}
        return {"backhaul_bytes": float(self._backhaul_bytes), "backhaul_energy_j": self._backhaul_energy_j}

    # -- checkpoints (fedkd.checkpoint) -------------------------------------------
    def get_state(self) -> dict:
        """The rounds and device rows so far, and what the open round has gathered."""
        return {**run_state(self.run), "pending": _columns(self._pending),
                "backhaul": (self._backhaul_bytes, self._backhaul_energy_j), "d2d": self._d2d}

    def set_state(self, state: dict) -> None:
        self.run = run_from_state(self.run.label, self.run.strategy, state)
        self._pending = _rows(state["pending"])
        self._backhaul_bytes, self._backhaul_energy_j = state["backhaul"]
        self._d2d = state.get("d2d")


def run_state(run: StrategyRun) -> dict:
    """A run's records as numbers, strings and arrays, for checkpoints."""
    return {"rounds": [asdict(r) for r in run.rounds], "devices": _columns(run.devices),
            "stopped_early": run.stopped_early, "wall_time_s": run.wall_time_s, "seed": run.seed,
            "labelled_public": dict(run.labelled_public), "labelled_public_total": run.labelled_public_total,
            "device_task_errors": run.device_task_errors, "first_device_task_error": run.first_device_task_error}


def run_from_state(label: str, strategy: str, state: dict) -> StrategyRun:
    """The inverse of :func:`run_state` (and of the run part of ``RoundRecorder.get_state``)."""
    # .get: checkpoints written before a field existed still resume, with its default.
    return StrategyRun(label=label, strategy=strategy, rounds=[RoundRecord(**r) for r in state["rounds"]],
                       devices=_rows(state["devices"]), stopped_early=state["stopped_early"],
                       wall_time_s=state["wall_time_s"], seed=int(state.get("seed", 0)),
                       labelled_public={str(k): int(v) for k, v in state.get("labelled_public", {}).items()},
                       labelled_public_total=int(state.get("labelled_public_total", 0)),
                       device_task_errors=int(state.get("device_task_errors", 0)),
                       first_device_task_error=str(state.get("first_device_task_error", "")))


def _columns(records: list[DeviceRecord]) -> dict[str, list | np.ndarray]:
    """Device rows as columns: numbers as arrays (compact in a checkpoint), the rest as lists."""
    out: dict[str, list | np.ndarray] = {}
    for f in fields(DeviceRecord):
        values = [getattr(r, f.name) for r in records]
        numeric = values and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values)
        out[f.name] = np.array(values) if numeric else values
    return out


def _rows(columns: dict[str, list | np.ndarray]) -> list[DeviceRecord]:
    names = [f.name for f in fields(DeviceRecord)]
    count = len(columns[names[0]])
    return [DeviceRecord(**{n: columns[n][i].item() if isinstance(columns[n], np.ndarray) else columns[n][i]
                            for n in names}) for i in range(count)]
