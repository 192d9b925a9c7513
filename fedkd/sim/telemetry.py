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

What an allocator is handed is a :class:`Telemetry` view: a read-only
snapshot of the reports at one moment, holding copies and no reference to the
world, so an allocator has no path to the truth (:func:`fedkd.allocator.plans_for`
turns anything else it is given into one).

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
    """The last reports of some devices, one entry per requested id (read-only arrays)."""

    device_ids: np.ndarray
    reported_at_s: np.ndarray
    age_s: np.ndarray  # now - reported_at_s
    online: np.ndarray  # whether the device was online when it reported
    battery_j: np.ndarray  # inf for mains-powered devices
    capacity_j: np.ndarray  # known from the device class, not reported; inf when mains powered
    uplink_bps: np.ndarray
    downlink_bps: np.ndarray
    compute_flops: np.ndarray


def _frozen_copy(values) -> np.ndarray:
    """A copy the view owns, marked read-only: nothing in it points back at the world's arrays."""
    copy = np.array(values, copy=True)
    copy.flags.writeable = False  # an allocator reads reports; it cannot rewrite them
    return copy


# Everything a view may hold besides the clock: the reported columns, report times and
# online flags, and the capacity each device registered (its class's battery size).
FIELDS = ("reported_at_s", "online", "capacity_j", *REPORTED)


class Telemetry:
    """An allocator's view of the world: each device's last report, never the truth.

    A *snapshot* taken when it is built (the simulated grid's ``telemetry()``
    builds one per call): it copies the reports of that moment into arrays it
    owns and keeps nothing else, so no attribute of it leads to the world, the
    population's true state (batteries, links, availability) or the grid, and
    later reports are seen by taking a new view. The arrays ``battery_j``,
    ``uplink_bps``, ``downlink_bps``, ``compute_flops``, ``online``,
    ``reported_at_s`` and ``capacity_j`` are read-only (``flags.writeable`` is
    False; writing raises ``ValueError``), over the whole population, indexed
    by device id, as :class:`fedkd.allocator.Telemetry` asks; ``now_s`` is the
    clock when the view was taken, so a report's age is
    ``now_s - reported_at_s[d]``. ``latest(ids)`` gathers everything about some
    devices at once.

    ``Telemetry(world)`` takes the view of a simulated world;
    :meth:`from_arrays` builds one from arrays (what
    :func:`fedkd.allocator.plans_for` does with any other telemetry object).
    A view built from arrays may lack some fields; reading one raises
    ``AttributeError``, so ``getattr(view, name, default)`` works.
    """

    __slots__ = ("_now_s", *(f"_{name}" for name in FIELDS))

    def __init__(self, world: DeviceWorld):
        log = world.reports
        self._fill(world.now_s, {"reported_at_s": log.reported_at_s, "online": log.online,
                                 "capacity_j": world.capacity_j, **log.values})

    @classmethod
    def from_arrays(cls, now_s: float | None = None, **columns) -> Telemetry:
        """A view of the given columns (any of ``FIELDS``; ``battery_j``, ``uplink_bps`` and
        ``compute_flops`` required), copied; ``now_s`` None: the view has no clock."""
        unknown = sorted(set(columns) - set(FIELDS))
        if unknown:
            raise TypeError(f"telemetry has no fields {unknown}; it has {list(FIELDS)}")
        missing = [name for name in ("battery_j", "uplink_bps", "compute_flops") if columns.get(name) is None]
        if missing:
            raise TypeError(f"telemetry needs {missing}")
        view = object.__new__(cls)
        view._fill(now_s, columns)
        return view

    def _fill(self, now_s: float | None, columns: dict) -> None:
        set_slot = object.__setattr__
        set_slot(self, "_now_s", None if now_s is None else float(now_s))
        for name in FIELDS:
            values = columns.get(name)
            set_slot(self, f"_{name}", None if values is None else _frozen_copy(values))

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"telemetry is read-only: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"telemetry is read-only: cannot delete {name!r}")

    def _field(self, name: str):
        value = object.__getattribute__(self, f"_{name}")
        if value is None:
            raise AttributeError(f"this telemetry view has no {name!r}")
        return value

    @property
    def now_s(self) -> float:
        return self._field("now_s")

    @property
    def battery_j(self) -> np.ndarray:
        return self._field("battery_j")

    @property
    def uplink_bps(self) -> np.ndarray:
        return self._field("uplink_bps")

    @property
    def downlink_bps(self) -> np.ndarray:
        return self._field("downlink_bps")

    @property
    def compute_flops(self) -> np.ndarray:
        return self._field("compute_flops")

    @property
    def online(self) -> np.ndarray:
        return self._field("online")

    @property
    def reported_at_s(self) -> np.ndarray:
        return self._field("reported_at_s")

    @property
    def capacity_j(self) -> np.ndarray:
        return self._field("capacity_j")

    def latest(self, device_ids) -> DeviceReports:
        ids = np.asarray(device_ids, dtype=np.int64)
        at = self.reported_at_s[ids]
        return DeviceReports(
            device_ids=_frozen_copy(ids), reported_at_s=_frozen_copy(at), age_s=_frozen_copy(self.now_s - at),
            online=_frozen_copy(self.online[ids]), capacity_j=_frozen_copy(self.capacity_j[ids]),
            **{name: _frozen_copy(getattr(self, name)[ids].astype(np.float64)) for name in REPORTED},
        )

    def __repr__(self) -> str:
        size = len(self.battery_j)
        clock = "no clock" if self._now_s is None else f"t = {self._now_s:g} s"
        return f"<Telemetry: last reports of {size} devices, {clock}>"
