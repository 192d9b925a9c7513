"""The allocator extension point: which devices take part in a round, and how.

An allocator reads the telemetry of the devices a strategy may ask this round
(battery, link speed, compute) and returns one plan per device: whether it
takes part, the modality it senses with, its model tier, its local epochs and
the codec of its uplink. It is found like a strategy (``resolve_allocator`` in
:mod:`fedkd.registry`: a name, ``module:Class``, ``path/to/file.py:Class`` or
the ``fedkd.allocators`` entry-point group).

Strategies that take an allocator (``ra_cmkd``) name it with their
``allocator`` parameter; the simulated grid's ``telemetry()`` is what they pass.
An allocator is always handed a read-only view of the devices' last reports
(:class:`fedkd.sim.telemetry.Telemetry`): :func:`plans_for` passes such a view
as it is and copies the report fields of anything else into one, so no
allocator can reach the world's true state, the population or the grid through
what it is given, nor write to the reports.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Protocol

import numpy as np

from .errors import FedkdError
from .sim.telemetry import FIELDS as REPORT_FIELDS
from .sim.telemetry import Telemetry as TelemetryView

BUILTIN_ALLOCATORS: dict[str, str] = {
    "all_in": "fedkd.allocator:AllIn",
    "resource_aware": "fedkd.resource_allocator:ResourceAware",
}


class Telemetry(Protocol):
    """What an allocator may read: numpy arrays over the population, indexed by device id.

    A strategy may pass :func:`plans_for` any object with at least these
    attributes (a dataclass, a SimpleNamespace); the allocator gets a read-only
    copy of its report fields (``fedkd.sim.telemetry.FIELDS``: also
    ``downlink_bps``, ``online``, ``reported_at_s``, ``capacity_j`` when present,
    and ``now_s``) and nothing else.
    """

    battery_j: np.ndarray  # charge left when last reported; inf for mains-powered devices
    uplink_bps: np.ndarray  # uplink speed when last reported
    compute_flops: np.ndarray  # compute speed when last reported, FLOP/s


@dataclass(frozen=True)
class DevicePlan:
    """What one device does this round. ``None`` keeps the scenario's setting."""

    take_part: bool = True
    modality: str | None = None  # None: every modality the device senses
    model_tier: str | None = None  # None: the device class's tier, else training.model_tier
    local_epochs: int | None = None  # None: training.local_epochs
    codec: str = "fp32"  # how its logits travel up: a fedkd.codecs spec (fp32, fp16, int8, topk:K)

    def __post_init__(self) -> None:
        from .codecs import get_codec

        epochs = self.local_epochs
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, Integral) or epochs < 1):
            raise FedkdError(f"DevicePlan: local_epochs must be a positive integer or None, got {self.local_epochs!r}")
        try:
            get_codec(self.codec)
        except ValueError as exc:
            raise FedkdError(f"DevicePlan: {exc}") from None


class Allocator(ABC):
    """Decides, device by device, who takes part in a round and how."""

    @abstractmethod
    def allocate(self, server_round: int, device_ids: Sequence[int],
                 telemetry: Telemetry) -> Mapping[int, DevicePlan]:
        """One plan for each of ``device_ids`` (the devices the strategy may ask)."""


class AllIn(Allocator):
    """Every candidate takes part, with the scenario's settings."""

    def allocate(self, server_round: int, device_ids: Sequence[int],
                 telemetry: Telemetry) -> dict[int, DevicePlan]:
        return {int(d): DevicePlan() for d in device_ids}


def telemetry_view(telemetry: Telemetry | None) -> TelemetryView | None:
    """What an allocator is handed: ``telemetry`` itself if it is already a read-only
    view (the simulated grid's ``telemetry()``), else a view holding read-only copies
    of its report fields only; None stays None (no telemetry: strategies then plan
    without it)."""
    if telemetry is None or isinstance(telemetry, TelemetryView):
        return telemetry
    columns = {name: getattr(telemetry, name) for name in REPORT_FIELDS if getattr(telemetry, name, None) is not None}
    try:
        return TelemetryView.from_arrays(getattr(telemetry, "now_s", None), **columns)
    except TypeError as exc:
        raise FedkdError(f"telemetry {type(telemetry).__name__} is not usable by an allocator: {exc}") from None


def plans_for(allocator: Allocator, server_round: int, device_ids: Sequence[int],
              telemetry: Telemetry | None) -> dict[int, DevicePlan]:
    """Call ``allocator`` on a read-only view of ``telemetry`` (:func:`telemetry_view`) and
    check its answer: one DevicePlan per candidate, no others."""
    plans = allocator.allocate(server_round, device_ids, telemetry_view(telemetry))
    name = type(allocator).__name__
    if not isinstance(plans, Mapping):
        raise FedkdError(f"allocator {name} returned {type(plans).__name__}; "
                         "expected a mapping of device id to DevicePlan")
    wanted, given = {int(d) for d in device_ids}, {int(d) for d in plans}
    if wanted != given:
        missing, extra = sorted(wanted - given)[:5], sorted(given - wanted)[:5]
        raise FedkdError(f"allocator {name} planned the wrong devices in round {server_round}: "
                         f"missing {missing}, not candidates {extra}")
    wrong = [d for d, p in plans.items() if not isinstance(p, DevicePlan)]
    if wrong:
        raise FedkdError(f"allocator {name} gave device {wrong[0]} a {type(plans[wrong[0]]).__name__}, "
                         "not a DevicePlan")
    return {int(d): p for d, p in plans.items()}
