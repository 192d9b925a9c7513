"""Device telemetry: what the server knows about each device, for allocators.

The server never sees a device's true state, only its last *report*. A device
reports when it completes a task (its battery after the task and the
bandwidth and speed it actually achieved) and, if
``world.telemetry.report_interval_s`` is set, every that many seconds while it
is online and alive (its battery and its current expected bandwidth and
speed). Every device enrolls at time 0 with its state then. Reports carry
multiplicative log-normal noise of spread ``noise_sigma``, drawn when the
report is made (seeded per report, so the same run reads the same numbers).

A report is written at the simulated moment it is made and read later, so the
view can only be stale, never ahead: a device that reported 10 J at t = 100 s
and has spent energy since still shows 10 J, with age ``now - 100``, until it
reports again.

Storage is columnar (one array per reported quantity over the population);
the values are float32 because reports are noisy estimates and a million
devices should cost a few megabytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..scenario import TelemetrySpec
from ..seeding import hashed_uniform

if TYPE_CHECKING:
    from .world import DeviceWorld

REPORTED = ("battery_j", "uplink_bps", "downlink_bps", "compute_flops")


class ReportLog:
    """The latest report of every device, as columns."""

    def __init__(self, size: int, spec: TelemetrySpec, seed: int):
        self.spec, self.seed = spec, seed
        self.reported_at_s = np.zeros(size)
        self.online = np.zeros(size, dtype=bool)
        self.values = {name: np.zeros(size, dtype=np.float32) for name in REPORTED}
        self._reports = 0  # report events so far; keys the noise draws

    def record(self, ids: np.ndarray, now_s: float, online: np.ndarray, **values: np.ndarray) -> None:
        """Devices ``ids`` report at ``now_s``: ``online`` and each of ``REPORTED`` as given."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        self._reports += 1
        # A report never replaces a newer one (task replies and heartbeats are written in order,
        # but a device's own report is the only one it may overwrite in time).
        newer = now_s >= self.reported_at_s[ids]
        ids = ids[newer]
        self.reported_at_s[ids] = now_s
        self.online[ids] = np.asarray(online, dtype=bool)[newer] if np.ndim(online) else bool(online)
        for name in REPORTED:
            value = np.broadcast_to(np.asarray(values[name], dtype=np.float64), newer.shape)[newer]
            if self.spec.noise_sigma > 0:
                value = value * self._noise(ids, name)
            self.values[name][ids] = value

    def get_state(self) -> dict:
        """Every device's last report and the report count (it keys the noise), for checkpoints."""
        return {"reported_at_s": self.reported_at_s.copy(), "online": self.online.copy(),
                "values": {name: v.copy() for name, v in self.values.items()}, "reports": self._reports}

    def set_state(self, state: dict) -> None:
        self.reported_at_s = np.array(state["reported_at_s"], dtype=np.float64)
        self.online = np.array(state["online"], dtype=bool)
        self.values = {name: np.array(state["values"][name], dtype=np.float32) for name in REPORTED}
        self._reports = int(state["reports"])

    def _noise(self, ids: np.ndarray, name: str) -> np.ndarray:
        # Box-Muller from two hashed uniforms: a standard normal per device, a pure
        # function of (seed, report event, quantity, device).
        u1 = hashed_uniform(ids, self.seed, "telemetry", self._reports, name, 1)
        u2 = hashed_uniform(ids, self.seed, "telemetry", self._reports, name, 2)
        normal = np.sqrt(-2 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)
        return np.exp(self.spec.noise_sigma * normal)


@dataclass(frozen=True)
class DeviceReports:
    """The last reports of some devices, one array entry per requested id."""

    device_ids: np.ndarray
    reported_at_s: np.ndarray
    age_s: np.ndarray  # now - reported_at_s
    online: np.ndarray  # whether the device was online when it reported
    battery_j: np.ndarray  # inf for mains-powered devices
    capacity_j: np.ndarray  # known from the device class, not reported; inf when mains powered
    uplink_bps: np.ndarray
    downlink_bps: np.ndarray
    compute_flops: np.ndarray


def _read_only(values: np.ndarray) -> np.ndarray:
    view = values.view()
    view.flags.writeable = False  # an allocator reads reports; it cannot rewrite them
    return view


class Telemetry:
    """An allocator's view of the world: the last report of each device, never the truth.

    ``latest(ids)`` gathers everything about some devices at once. The
    attributes ``battery_j``, ``uplink_bps``, ``downlink_bps``,
    ``compute_flops``, ``online`` and ``reported_at_s`` are read-only arrays
    over the whole population, indexed by device id (no copy), as
    :class:`fedkd.allocator.Telemetry` asks; a report's age is
    ``now_s - reported_at_s[d]``.
    """

    def __init__(self, world: DeviceWorld):
        self.world = world

    @property
    def now_s(self) -> float:
        return self.world.now_s

    @property
    def battery_j(self) -> np.ndarray:
        return _read_only(self.world.reports.values["battery_j"])

    @property
    def uplink_bps(self) -> np.ndarray:
        return _read_only(self.world.reports.values["uplink_bps"])

    @property
    def downlink_bps(self) -> np.ndarray:
        return _read_only(self.world.reports.values["downlink_bps"])

    @property
    def compute_flops(self) -> np.ndarray:
        return _read_only(self.world.reports.values["compute_flops"])

    @property
    def online(self) -> np.ndarray:
        return _read_only(self.world.reports.online)

    @property
    def reported_at_s(self) -> np.ndarray:
        return _read_only(self.world.reports.reported_at_s)

    def latest(self, device_ids) -> DeviceReports:
        ids = np.asarray(device_ids, dtype=np.int64)
        log = self.world.reports
        at = log.reported_at_s[ids]
        return DeviceReports(
            device_ids=ids, reported_at_s=at, age_s=self.world.now_s - at, online=log.online[ids],
            capacity_j=self.world.capacity_j[ids],
            **{name: log.values[name][ids].astype(np.float64) for name in REPORTED},
        )
