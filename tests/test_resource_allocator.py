"""The resource-aware allocator on hand-made telemetry."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fedkd.allocator import DevicePlan, plans_for
from fedkd.codecs import get_codec
from fedkd.resource_allocator import DeviceHardware, ResourceAware, TaskShape

HW = DeviceHardware(modalities=("camera",), model_tier="small", samples=100, latency_s=0.0, capacity_j=100.0,
                    energy_per_flop_j=1e-9, energy_per_byte_up_j=1e-6, energy_per_byte_down_j=0.0)
FLOPS = {"small": (1_000_000, 300_000), "tiny": (200_000, 60_000), "base": (4_000_000, 1_200_000)}


def allocator() -> ResourceAware:
    a = ResourceAware(safety=1.0, battery_reserve=0.2, max_local_epochs=2, codecs=("fp16", "int8"))
    a.bind(lambda d: HW, lambda tier, mods: FLOPS[tier],
           TaskShape(public_batch=10, distill_samples=10, num_classes=10, downlink_bytes=0,
                     reply_overhead_bytes=0), deadline_s=100.0)
    return a


def telemetry(battery_j, uplink_bps, compute_flops=1e9):
    return SimpleNamespace(battery_j=np.array(battery_j, dtype=float), uplink_bps=np.array(uplink_bps, dtype=float),
                           downlink_bps=np.full(len(battery_j), 1e9), compute_flops=np.full(len(battery_j), compute_flops))


def test_codec_sizes_used_below():
    # 10 samples x 10 classes: fp16 = 20 header + 200 = 220 B; int8 = 20 + 10 * 4 scales + 100 = 160 B.
    assert get_codec("fp16").encoded_size(10, 10) == 220
    assert get_codec("int8").encoded_size(10, 10) == 160


def test_plans_follow_battery_and_link():
    # Prepare: device 0 is healthy; device 1 has 0.1 J above its 20 J reserve; device 2 none;
    # device 3 has a 15 bit/s uplink.
    plans = plans_for(allocator(), 1, [0, 1, 2, 3],
                      telemetry([100.0, 20.1, 20.0, 100.0], [1e6, 1e6, 1e6, 15.0]))
    # Device 0, the richest plan: small model, 2 epochs, fp16. FLOPs = 1e6 * (100 * 2 + 10)
    # + 3e5 * 10 = 2.13e8 -> 0.213 J and 0.213 s: fits.
    assert plans[0] == DevicePlan(True, "camera", "small", 2, "fp16")
    # Device 1 has 0.1 J to spend: small/2 epochs needs 0.213 J, small/1 epoch
    # 1e6 * 110 + 3e6 = 1.13e8 -> 0.113 J: too much; tiny/2 epochs
    # 2e5 * 210 + 6e4 * 10 = 4.26e7 -> 0.0426 J (+ 220 B * 1e-6 J/B): fits.
    assert plans[1] == DevicePlan(True, "camera", "tiny", 2, "fp16")
    # Device 2 has nothing above its reserve: it sits the round out.
    assert plans[2].take_part is False
    # Device 3: fp16 is 1760 bits = 117 s at 15 bit/s, past the 100 s deadline;
    # int8 is 1280 bits = 85.3 s (+ 0.213 s compute): the smaller codec fits.
    assert plans[3] == DevicePlan(True, "camera", "small", 2, "int8")


def test_mains_powered_devices_are_never_limited_by_battery():
    hw = DeviceHardware(**{**HW.__dict__, "capacity_j": float("inf")})
    a = allocator()
    a.bind(lambda d: hw, lambda tier, mods: FLOPS[tier], a.shape, 100.0)
    plans = a.allocate(1, [0], telemetry([float("inf")], [1e6]))
    assert plans[0] == DevicePlan(True, "camera", "small", 2, "fp16")


def test_multi_sensor_device_may_drop_to_one_sensor():
    hw = DeviceHardware(**{**HW.__dict__, "modalities": ("camera", "sensor"), "model_tier": "tiny"})
    flops = {("camera", "sensor"): (400_000, 120_000), ("camera",): (200_000, 60_000), ("sensor",): (20_000, 6_000)}
    a = allocator()
    a.bind(lambda d: hw, lambda tier, mods: flops[mods], a.shape, 100.0)
    # 20.01 J: 0.01 J to spend. Both sensors, 2 epochs: 4e5 * 210 + 1.2e5 * 10 = 8.52e7 -> 0.085 J: no.
    # Camera alone at 1 epoch: 2e5 * 110 + 6e4 * 10 = 2.26e7 -> 0.0226 J: no. Sensor alone,
    # 2 epochs: 2e4 * 210 + 6e3 * 10 = 4.26e6 -> 0.00426 J (+ 0.00022 J upload): fits.
    plans = a.allocate(1, [0], telemetry([20.01], [1e6]))
    assert plans[0] == DevicePlan(True, "sensor", "tiny", 2, "fp16")


def test_a_slow_downlink_gets_a_smaller_model_to_download():
    # With fog models a device downloads the model of its plan: 100 kB for small, 20 kB for tiny.
    sizes = {"small": 100_000, "tiny": 20_000}
    a = allocator()
    a.bind(lambda d: HW, lambda tier, mods: FLOPS[tier],
           TaskShape(public_batch=10, distill_samples=0, num_classes=10, downlink_bytes=0,
                     reply_overhead_bytes=0, model_bytes=lambda tier, mods: sizes[tier]), deadline_s=100.0)
    slow = SimpleNamespace(battery_j=np.array([100.0, 100.0]), uplink_bps=np.array([1e6, 1e6]),
                           downlink_bps=np.array([1e9, 8_000.0]), compute_flops=np.array([1e9, 1e9]))
    plans = a.allocate(1, [0, 1], slow)
    # A fast link takes the small model (0.8 ms to download).
    assert plans[0] == DevicePlan(True, "camera", "small", 2, "fp16")
    # At 8 kbit/s the small model alone takes 800 kbit / 8 kbit/s = 100 s, the whole
    # deadline; tiny takes 20 s plus 0.04 s of compute: it fits.
    assert plans[1] == DevicePlan(True, "camera", "tiny", 2, "fp16")


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="safety"):
        ResourceAware(safety=0)
    with pytest.raises(ValueError, match="codec"):
        ResourceAware(codecs=("zip",))


def test_codecs_can_differ_by_modality():
    hw = DeviceHardware(**{**HW.__dict__, "modalities": ("camera", "sensor"), "capacity_j": float("inf")})
    a = ResourceAware(safety=1.0, codecs=("fp16",), modality_codecs={"sensor": ["topk:1"]})
    a.bind(lambda d: hw, lambda tier, mods: FLOPS[tier], allocator().shape, 100.0)
    # Both sensors, and the camera alone, use the general list; the sensor alone its own.
    plans = a.plans_by_richness(hw)
    assert {codec for _, sensors, _, codec in plans if sensors == ("sensor",)} == {"topk:1"}
    assert {codec for _, sensors, _, codec in plans if sensors != ("sensor",)} == {"fp16"}
    # 15 bit/s: fp16 logits (1760 bits) miss the 100 s deadline with either sensor set;
    # top-1 for 10 rows x 10 classes is a 20 B header + 10 x (2 B index + 2 B value) + 10 x 4 B
    # fill = 100 B = 800 bits = 53.3 s: the device falls back to its sensor alone, whose codec fits.
    assert get_codec("topk:1").encoded_size(10, 10) == 100
    plans = a.allocate(1, [0], telemetry([float("inf")], [15.0]))
    assert plans[0] == DevicePlan(True, "sensor", "small", 2, "topk:1")
    with pytest.raises(ValueError, match="codec"):
        ResourceAware(modality_codecs={"sensor": ["zip"]})


def test_through_plans_for_a_device_without_a_reported_downlink_is_assumed_to_have_its_uplinks():
    # The view plans_for hands on has no downlink_bps when the strategy gave none: the allocator
    # then takes the uplink's speed, as a device that reported 1e6 bit/s both ways.
    sizes = {"small": 100_000, "tiny": 20_000}
    a = allocator()
    a.bind(lambda d: HW, lambda tier, mods: FLOPS[tier],
           TaskShape(public_batch=10, distill_samples=0, num_classes=10, downlink_bytes=0,
                     reply_overhead_bytes=0, model_bytes=lambda tier, mods: sizes[tier]), deadline_s=100.0)
    without = SimpleNamespace(battery_j=np.array([100.0]), uplink_bps=np.array([8_000.0]),
                              compute_flops=np.array([1e9]))
    both = SimpleNamespace(**vars(without), downlink_bps=np.array([8_000.0]))
    assert plans_for(a, 1, [0], without) == plans_for(a, 1, [0], both)
    # 8 kbit/s each way: the small model's 100 s download misses the deadline; tiny's 20 s fits.
    assert plans_for(a, 1, [0], without)[0].model_tier == "tiny"
