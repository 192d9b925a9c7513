"""Results as typed objects in memory. Only :mod:`fedkd.report` writes them out."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceRecord:
    """One task of one device in one round."""

    strategy: str
    round: int
    phase: str  # "train" or "evaluate" (Flower's message type)
    device_id: int
    device_class: str
    status: str  # "ok" or "failed"
    reason: str  # "" when ok; deadline | battery | offline | error
    start_s: float
    end_s: float
    bytes_down: int
    bytes_up: int
    energy_j: float
    battery_j: float  # charge left after the task; inf for mains-powered devices


@dataclass(frozen=True)
class RoundRecord:
    """One round of one strategy. Traffic and energy are this round's; time is the clock."""

    strategy: str
    round: int
    sim_time_s: float
    accuracy: float
    bytes_up: int
    bytes_down: int
    energy_j: float
    participants: int  # devices whose training reply arrived in time
    dropped: int  # tasks that failed this round
    available_devices: int  # online and alive when the round ended
    dead_devices: int  # battery at or below the floor when the round ended
    metrics: dict[str, float] = field(default_factory=dict)  # per-modality accuracy, losses


@dataclass
class StrategyRun:
    label: str
    strategy: str  # registry name or reference
    rounds: list[RoundRecord] = field(default_factory=list)
    devices: list[DeviceRecord] = field(default_factory=list)
    stopped_early: str | None = None  # why the run ended before its last round
    wall_time_s: float = 0.0
    seed: int = 0  # the scenario seed this run used (fedkd.runner sets it; several seeds: one run each)
    # Label budget: purpose -> distinct labelled public samples read for it, and the
    # distinct count over all purposes (a sample read for two purposes counts once).
    labelled_public: dict[str, int] = field(default_factory=dict)
    labelled_public_total: int = 0
    # Device tasks whose code raised or whose reply failed the checks (reasons "error" and
    # "invalid"): a simulated device failure, but also the sign of a bug in a device half.
    device_task_errors: int = 0
    first_device_task_error: str = ""  # "round r, device d (phase): what it said"
