"""Collects what the simulated grid observes, round by round."""
from __future__ import annotations

from ..results import DeviceRecord, RoundRecord, StrategyRun
from .world import OK, DeviceWorld, TaskOutcome


class RoundRecorder:
    def __init__(self, label: str, strategy: str, world: DeviceWorld):
        self.world = world
        self.run = StrategyRun(label=label, strategy=strategy)
        self._pending: list[DeviceRecord] = []
        self._backhaul_bytes, self._backhaul_energy_j = 0, 0.0

    @property
    def current_round(self) -> int:
        """The round in progress: rounds are closed by the server's evaluation."""
        return len(self.run.rounds)

    def record_phase(self, phase: str, outcomes: list[TaskOutcome]) -> None:
        classes = self.world.population.classes
        for o in outcomes:
            self._pending.append(DeviceRecord(
                self.run.label, self.current_round, phase, o.device_id,
                classes[self.world.class_index[o.device_id]].name, o.status, o.reason,
                o.start_s, o.end_s, o.bytes_down, o.bytes_up, o.energy_j, o.battery_j))

    def record_backhaul(self, moved_bytes: int, energy_j: float) -> None:
        self._backhaul_bytes += moved_bytes
        self._backhaul_energy_j += energy_j

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
            metrics={**metrics, **self.world.battery_snapshot(), **self._backhaul()},
        )
        self.run.rounds.append(record)
        self.run.devices.extend(tasks)
        self._pending = []
        self._backhaul_bytes, self._backhaul_energy_j = 0, 0.0
        return record

    def _backhaul(self) -> dict[str, float]:
        # Only fog-tier strategies move backhaul traffic; others get no such columns.
        if not self._backhaul_bytes:
            return {}
        return {"backhaul_bytes": float(self._backhaul_bytes), "backhaul_energy_j": self._backhaul_energy_j}
