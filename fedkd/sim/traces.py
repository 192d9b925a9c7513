"""Replay of measured device traces: a CSV of time-stamped values per device.

A device class with ``trace: path/to/file.csv`` replays that file instead of
drawing the traced quantities from its profile. The format::

    time_s,device,online,uplink_bps,downlink_bps,compute_flops,charge_w
    0,0,1,2.0e6,1.0e7,2.0e9,0
    1800,0,0,2.0e6,1.0e7,2.0e9,0
    ...

- ``time_s`` (required): seconds of simulated time since the start of the run,
  >= 0. Values are piecewise constant: a row holds from its ``time_s`` until
  the device's next row; the first row also holds before it, the last one
  forever after. A device's times must be strictly increasing; rows need not
  be grouped by device.
- ``device`` (optional): the trace's device number, 0 .. n-1 with none
  missing. The k-th device of the class (counting the class's devices in id
  order from 0) replays trace device ``k mod n``. Without this column the one
  series is replayed by every device of the class.
- ``online`` (0 or 1), ``uplink_bps``, ``downlink_bps``, ``compute_flops``
  (> 0) and ``charge_w`` (>= 0): each optional; at least one must be present.
  A quantity with a column is replayed as given: it replaces the class's value
  *and* its fluctuation (jitter, quality states, diurnal factors, the
  availability chain, recharging). A quantity without a column follows the
  class profile. Cells may not be empty.

Lines starting with ``#`` are comments. A missing or malformed file is an
error naming the file, the line and the column, reported when the scenario
is loaded. Relative paths are taken from the directory fedkd runs in.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FedkdError

VALUE_COLUMNS = ("online", "uplink_bps", "downlink_bps", "compute_flops", "charge_w")
COLUMNS = ("time_s", "device", *VALUE_COLUMNS)


class TraceError(FedkdError, ValueError):
    """A trace file that cannot be read or does not follow the format.

    A ``ValueError`` too, so that scenario validation reports it under the
    class's ``trace`` key.
    """


@dataclass(frozen=True)
class Trace:
    """A loaded trace: rows sorted by (device, time), with lookups vectorised over devices."""

    path: str
    devices: int  # trace devices, numbered 0 .. devices - 1
    device: np.ndarray  # per row
    time_s: np.ndarray  # per row
    values: dict[str, np.ndarray]  # column -> per-row values
    first_row: np.ndarray  # per trace device: index of its first row
    stride_s: float  # more than the last time: rows sort by device * stride_s + time_s
    cumulative: dict[str, np.ndarray]  # column -> per row, its integral from time 0 to the row's time
    row_keys: np.ndarray  # device * stride_s + time_s, ascending

    def has(self, column: str) -> bool:
        return column in self.values

    def _row_at(self, trace_device: np.ndarray, t_s: float) -> np.ndarray:
        # One searchsorted over composite keys (device * stride + time) finds the
        # row in force for every device at once; before a device's first row,
        # that first row holds.
        query = trace_device * self.stride_s + min(max(t_s, 0.0), self.stride_s - 1.0)
        row = np.searchsorted(self.row_keys, query, side="right") - 1
        return np.maximum(row, self.first_row[trace_device])

    def value(self, column: str, trace_device: np.ndarray, t_s: float) -> np.ndarray:
        """The value of ``column`` in force at ``t_s`` for each trace device."""
        return self.values[column][self._row_at(np.asarray(trace_device), t_s)]

    def integral(self, column: str, trace_device: np.ndarray, start_s: float, end_s: float) -> np.ndarray:
        """The integral of ``column`` over [start_s, end_s] (e.g. joules from ``charge_w``)."""
        cumulative = self.cumulative[column]
        trace_device = np.asarray(trace_device)

        def at(t_s: float) -> np.ndarray:
            row = self._row_at(trace_device, t_s)
            return cumulative[row] + self.values[column][row] * (t_s - self.time_s[row])

        return at(end_s) - at(start_s)

    def next_offline_s(self, trace_device: int, t_s: float) -> float:
        """When the device is next offline at or after ``t_s`` (``inf`` if never)."""
        if not self.has("online"):
            return math.inf
        row = int(self._row_at(np.array([trace_device]), t_s)[0])
        online = self.values["online"]
        if not online[row]:
            return float(t_s)
        rows = np.flatnonzero((self.device == trace_device) & (online == 0) & (self.time_s > t_s))
        return float(self.time_s[rows[0]]) if len(rows) else math.inf


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{where}, column {column}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise TraceError(f"{where}, column {column}: expected a finite number, got {text!r}")
    return value


def _check(column: str, value: float, where: str) -> None:
    if column == "time_s" and value < 0:
        raise TraceError(f"{where}, column time_s: expected seconds >= 0, got {value:g}")
    if column == "device" and (value < 0 or value != int(value)):
        raise TraceError(f"{where}, column device: expected a device number 0, 1, 2, ..., got {value:g}")
    if column == "online" and value not in (0.0, 1.0):
        raise TraceError(f"{where}, column online: expected 0 or 1, got {value:g}")
    if column in ("uplink_bps", "downlink_bps", "compute_flops") and value <= 0:
        raise TraceError(f"{where}, column {column}: expected a number > 0, got {value:g}")
    if column == "charge_w" and value < 0:
        raise TraceError(f"{where}, column charge_w: expected watts >= 0, got {value:g}")


def load_trace(path: str | Path) -> Trace:
    """Read and check a trace CSV; a :class:`TraceError` names file, line and column."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"trace file {name} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace file {name}: {exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise TraceError(f"trace file {name} is empty; expected a header {','.join(COLUMNS)}")
    header_line, header_text = lines[0]
    header = [h.strip() for h in next(csv.reader([header_text]))]
    for column in header:
        if column not in COLUMNS:
            raise TraceError(f"trace {name} line {header_line}: unknown column {column!r}; "
                             f"expected some of {', '.join(COLUMNS)}")
    if len(set(header)) != len(header):
        raise TraceError(f"trace {name} line {header_line}: a column is named twice")
    if "time_s" not in header:
        raise TraceError(f"trace {name} line {header_line}: the column time_s is required")
    if not set(header) & set(VALUE_COLUMNS):
        raise TraceError(f"trace {name} line {header_line}: no value column; "
                         f"expected at least one of {', '.join(VALUE_COLUMNS)}")
    if len(lines) == 1:
        raise TraceError(f"trace {name}: no rows after the header")
    rows = []
    for number, line in lines[1:]:
        cells = [c.strip() for c in next(csv.reader([line]))]
        where = f"trace {name} line {number}"
        if len(cells) != len(header):
            raise TraceError(f"{where}: expected {len(header)} cells ({','.join(header)}), got {len(cells)}")
        row = []
        for column, cell in zip(header, cells):
            value = _number(cell, where, column)
            _check(column, value, where)
            row.append(value)
        rows.append(row)
    table = np.array(rows, dtype=np.float64)
    device = table[:, header.index("device")].astype(np.int64) if "device" in header else np.zeros(len(rows), np.int64)
    time_s = table[:, header.index("time_s")]
    order = np.lexsort((time_s, device))
    device, time_s, table = device[order], time_s[order], table[order]
    devices = int(device.max()) + 1
    missing = sorted(set(range(devices)) - set(device.tolist()))
    if missing:
        raise TraceError(f"trace {name}: devices are numbered 0..{devices - 1}, but device {missing[0]} has no row")
    same = (device[1:] == device[:-1]) & (time_s[1:] <= time_s[:-1])
    if same.any():
        i = int(np.flatnonzero(same)[0])
        raise TraceError(f"trace {name}: device {device[i]} has two rows at time_s {time_s[i]:g}; "
                         "a device's times must be strictly increasing")
    values = {c: table[:, header.index(c)] for c in VALUE_COLUMNS if c in header}
    first_row = np.searchsorted(device, np.arange(devices), side="left")
    cumulative = {c: _cumulative(v, device, time_s, first_row) for c, v in values.items()}
    stride_s = float(time_s.max()) + 1.0
    return Trace(name, devices, device, time_s, values, first_row, stride_s, cumulative,
                 device * stride_s + time_s)


def _cumulative(v: np.ndarray, device: np.ndarray, t: np.ndarray, first_row: np.ndarray) -> np.ndarray:
    """Per row: the integral of a column from time 0 to the row's time."""
    held = np.zeros(len(t))
    held[1:] = v[:-1] * np.diff(t)  # what the previous row contributes up to this one
    first = first_row[device] == np.arange(len(t))
    held[first] = v[first] * t[first]  # the first row holds back to time 0
    # Restart the running sum at each device's first row.
    total = np.cumsum(held)
    base = total[first_row] - held[first_row]
    return total - base[device]


@dataclass(frozen=True)
class TraceBinding:
    """A device class's devices bound to the trace they replay."""

    trace: Trace
    device_ids: np.ndarray  # the class's devices, ascending
    trace_device: np.ndarray  # for each of them, the trace device it replays (k-th device: k mod n)


class TraceReplay:
    """Every class of a population that replays a trace, vectorised over its devices."""

    def __init__(self, traces: list[str | None], class_index: np.ndarray):
        self.bindings: list[TraceBinding] = []
        self.binding_of = np.full(len(class_index), -1, dtype=np.int32)  # -1: follows its class profile
        self.replays = np.zeros(len(class_index), dtype=np.int32)  # the trace device it replays
        for k, path in enumerate(traces):
            if path is not None:
                ids = np.flatnonzero(class_index == k)
                trace = load_trace(path)
                binding = TraceBinding(trace, ids, np.arange(len(ids)) % trace.devices)
                self.binding_of[ids] = len(self.bindings)
                self.replays[ids] = binding.trace_device
                self.bindings.append(binding)

    def _with(self, column: str):
        return [(i, b) for i, b in enumerate(self.bindings) if b.trace.has(column)]

    def replayed(self, device: int, column: str) -> bool:
        i = self.binding_of[device]
        return i >= 0 and self.bindings[i].trace.has(column)

    def set_online(self, online: np.ndarray, t_s: float) -> None:
        """Write the traced online flags at ``t_s`` into ``online``."""
        for _, b in self._with("online"):
            online[b.device_ids] = b.trace.value("online", b.trace_device, t_s) > 0

    def set_charge_j(self, charge_j: np.ndarray, start_s: float, end_s: float) -> None:
        """Replace the charged energy over [start_s, end_s] of traced devices in ``charge_j``."""
        for _, b in self._with("charge_w"):
            charge_j[b.device_ids] = b.trace.integral("charge_w", b.trace_device, start_s, end_s)

    def set_rates(self, ids: np.ndarray, t_s: float, rates: dict[str, np.ndarray]) -> None:
        """Replace the traced entries of ``rates`` (column -> values over ``ids``) by their values at t_s."""
        for i, b in enumerate(self.bindings):
            mine = self.binding_of[ids] == i
            if mine.any():
                for column, values in rates.items():
                    if b.trace.has(column):
                        values[mine] = b.trace.value(column, self.replays[ids[mine]], t_s)

    def next_offline_s(self, device: int, t_s: float) -> float | None:
        """When a device with a traced ``online`` next goes offline; ``None`` if not traced."""
        if not self.replayed(device, "online"):
            return None
        return self.bindings[self.binding_of[device]].trace.next_offline_s(int(self.replays[device]), t_s)

    def charge_changes_s(self, start_s: float, end_s: float) -> set[float]:
        """Times in (start_s, end_s) where some traced charge power changes."""
        out: set[float] = set()
        for _, b in self._with("charge_w"):
            times = b.trace.time_s
            out |= set(times[(times > start_s) & (times < end_s)].tolist())
        return out
