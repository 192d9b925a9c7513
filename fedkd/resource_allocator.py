"""The resource-aware allocator: from telemetry only, a plan per device that
meets the round deadline and keeps the battery above a reserve.

For each candidate it tries every plan it could follow, from the richest
(the device's largest model, all its sensors, the most local epochs, the most
precise codec) down to the cheapest, predicts the plan's time and energy from
the device's last report and its registered hardware, and keeps the richest
plan that fits with a safety margin. A device for which no plan fits sits the
round out, instead of failing mid-task and wasting the energy it spent.

What it knows of a device's state is the read-only telemetry view
:func:`fedkd.allocator.plans_for` hands it (the device's last, possibly stale
and noisy report; a device that reported no downlink speed is assumed to have
its uplink's); what it knows of its hardware is the registration its strategy
binds (:meth:`ResourceAware.bind`). Neither leads to the simulated world.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .allocator import Allocator, DevicePlan, Telemetry
from .codecs import get_codec

TIER_ORDER = ("base", "small", "tiny")  # richest first


@dataclass(frozen=True)
class DeviceHardware:
    """What a device registers once: its sensors, largest model, shard size, energy costs."""

    modalities: tuple[str, ...]
    model_tier: str
    samples: int
    latency_s: float
    capacity_j: float
    energy_per_flop_j: float
    energy_per_byte_up_j: float
    energy_per_byte_down_j: float


@dataclass(frozen=True)
class TaskShape:
    """The strategy's side of a task's cost: what it sends and asks for."""

    public_batch: int
    distill_samples: int
    num_classes: int
    downlink_bytes: int  # targets and config the device receives
    reply_overhead_bytes: int  # the reply's records besides the logits
    # Bytes of a model the device downloads to start from, by (tier, modalities); None: none.
    # Called for every plan tried: cache it on the strategy's side.
    model_bytes: Callable[[str, tuple[str, ...]], int] | None = None


# (tier, modalities) -> (train FLOPs per sample, forward FLOPs per sample)
FlopsFn = Callable[[str, tuple[str, ...]], tuple[int, int]]


class ResourceAware(Allocator):
    """Richest plan that meets the deadline with a margin and keeps a battery reserve."""

    def __init__(self, safety: float = 0.7, battery_reserve: float = 0.2, max_local_epochs: int = 2,
                 codecs: Sequence[str] = ("fp16", "int8", "topk:1"),
                 modality_codecs: Mapping[str, Sequence[str]] | None = None):
        if not 0 < safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {safety}")
        if not 0 <= battery_reserve < 1:
            raise ValueError(f"battery_reserve must be in [0, 1), got {battery_reserve}")
        for codec in [*codecs, *(c for cs in (modality_codecs or {}).values() for c in cs)]:
            get_codec(codec)
        self.safety, self.battery_reserve = safety, battery_reserve
        self.max_local_epochs, self.codecs = max_local_epochs, tuple(codecs)
        # Codecs to try, richest first, for logits computed from one sensor set ("camera",
        # "sensor", "camera+sensor"): a sensor whose logits are nearly one-hot loses nothing
        # to top-1, a camera's uncertain ones do. Sets not listed use ``codecs``.
        self.modality_codecs = {m: tuple(cs) for m, cs in (modality_codecs or {}).items()}
        for m, cs in self.modality_codecs.items():
            if not cs:
                raise ValueError(f"modality_codecs[{m!r}] lists no codec")
        self.hardware: Callable[[int], DeviceHardware] | None = None
        self.flops: FlopsFn | None = None
        self.shape: TaskShape | None = None
        self.deadline_s = float("inf")

    def bind(self, hardware: Callable[[int], DeviceHardware], flops: FlopsFn, shape: TaskShape,
             deadline_s: float) -> None:
        """What the strategy knows and the allocator needs: registrations, model costs, the task."""
        self.hardware, self.flops, self.shape, self.deadline_s = hardware, flops, shape, deadline_s

    def plans_by_richness(self, hw: DeviceHardware) -> list[tuple[str, tuple[str, ...], int, str]]:
        tiers = TIER_ORDER[TIER_ORDER.index(hw.model_tier):]
        sensor_sets = [hw.modalities] + ([(m,) for m in hw.modalities] if len(hw.modalities) > 1 else [])
        epochs = range(self.max_local_epochs, 0, -1)
        return [(tier, sensors, n, codec) for tier, sensors, n in itertools.product(tiers, sensor_sets, epochs)
                for codec in self.modality_codecs.get("+".join(sensors), self.codecs)]

    def predict(self, hw: DeviceHardware, plan: tuple[str, tuple[str, ...], int, str], uplink_bps: float,
                downlink_bps: float, compute_flops: float) -> tuple[float, float]:
        """Predicted (seconds, joules) of one plan on one device."""
        tier, modalities, epochs, codec = plan
        shape = self.shape
        train_per_sample, forward_per_sample = self.flops(tier, modalities)
        flops = (train_per_sample * (hw.samples * epochs + shape.distill_samples)
                 + forward_per_sample * shape.public_batch)
        up = _encoded_size(codec, shape.public_batch, shape.num_classes) + shape.reply_overhead_bytes
        down = shape.downlink_bytes + (shape.model_bytes(tier, modalities) if shape.model_bytes else 0)
        seconds = 2 * hw.latency_s + 8 * down / downlink_bps + flops / compute_flops + 8 * up / uplink_bps
        joules = flops * hw.energy_per_flop_j + down * hw.energy_per_byte_down_j + up * hw.energy_per_byte_up_j
        return seconds, joules

    def allocate(self, server_round: int, device_ids: Sequence[int],
                 telemetry: Telemetry) -> Mapping[int, DevicePlan]:
        if self.hardware is None:
            raise RuntimeError("ResourceAware needs bind() from its strategy before allocating")
        downlink = getattr(telemetry, "downlink_bps", telemetry.uplink_bps)
        plans = {}
        for device in map(int, device_ids):
            hw = self.hardware(device)
            battery = float(telemetry.battery_j[device])
            spare_j = battery - self.battery_reserve * hw.capacity_j if np.isfinite(hw.capacity_j) else np.inf
            chosen = DevicePlan(take_part=False)
            for plan in self.plans_by_richness(hw):
                seconds, joules = self.predict(hw, plan, float(telemetry.uplink_bps[device]),
                                               float(downlink[device]), float(telemetry.compute_flops[device]))
                if seconds <= self.safety * self.deadline_s and joules <= spare_j:
                    tier, modalities, epochs, codec = plan
                    chosen = DevicePlan(True, "+".join(modalities), tier, epochs, codec)
                    break
            plans[device] = chosen
        return plans


@lru_cache(maxsize=256)
def _encoded_size(codec: str, rows: int, cols: int) -> int:
    return get_codec(codec).encoded_size(rows, cols)
