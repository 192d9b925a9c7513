"""The allocator extension point: which devices take part in a round, and how.

An allocator reads the telemetry of the devices a strategy may ask this round
(battery, link speed, compute) and returns one plan per device: whether it
takes part, the modality it senses with, its model tier, its local epochs and
the codec of its uplink. It is found like a strategy (``resolve_allocator`` in
:mod:`fedkd.registry`: a name, ``module:Class``, ``path/to/file.py:Class`` or
the ``fedkd.allocators`` entry-point group).

Strategies that take an allocator (``ra_cmkd``) name it with their
``allocator`` parameter; the simulated grid's ``telemetry()`` is what they pass.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Protocol

import numpy as np

from .errors import FedkdError

BUILTIN_ALLOCATORS: dict[str, str] = {
    "all_in": "fedkd.allocator:AllIn",
    "resource_aware": "fedkd.resource_allocator:ResourceAware",
}


class Telemetry(Protocol):
    """What an allocator may read: numpy arrays over the population, indexed by device id.

    Any object with these attributes will do (a dataclass, a SimpleNamespace).
    """

    battery_j: np.ndarray  # charge left; inf for mains-powered devices
    uplink_bps: np.ndarray  # this round's uplink speed
    compute_flops: np.ndarray  # this round's compute speed, FLOP/s


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


def plans_for(allocator: Allocator, server_round: int, device_ids: Sequence[int],
              telemetry: Telemetry) -> dict[int, DevicePlan]:
    """Call ``allocator`` and check its answer: one DevicePlan per candidate, no others."""
    plans = allocator.allocate(server_round, device_ids, telemetry)
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
