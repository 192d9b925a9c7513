"""Task timelines and energy in the SimPy world, worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.scenario import PopulationSpec, WorldSpec
from fedkd.sim.population import Population
from fedkd.sim.world import DeviceWorld, TaskCost

MB = 1_000_000


def make_world(deadline_s=1000.0, battery_j=None, mean_online_s=1e12, **device) -> DeviceWorld:
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "latency_s": 0.0, "jitter_sigma": 0.0, "battery_j": battery_j, "initial_charge_min": 1.0,
           "energy_per_flop_j": 0.0, "energy_per_byte_up_j": 0.0, "energy_per_byte_down_j": 0.0,
           "availability": {"mean_online_s": mean_online_s, "mean_offline_s": 1.0}} | device
    population = Population(PopulationSpec(devices=4, classes=[cls]), seed=0)
    world = DeviceWorld(population, WorldSpec(round_deadline_s=deadline_s), seed=0)
    world.online[:] = True
    return world


def test_one_megabyte_at_one_megabit_takes_eight_seconds():
    # Prepare: 1 MB down, nothing computed, nothing up; 1 Mbit/s, no latency.
    world = make_world()
    # Execute
    [outcome] = world.run_phase([TaskCost(0, bytes_down=MB, flops=0, bytes_up=0)], {})
    # Assert: 8e6 bits / 1e6 bit/s = 8 s.
    assert outcome.status == "ok"
    assert outcome.end_s - outcome.start_s == pytest.approx(8.0)
    assert world.now_s == pytest.approx(8.0)


def test_full_timeline_adds_latency_compute_and_both_links():
    # Prepare: 0.5 MB down at 2 Mbit/s (2 s) + 0.1 s latency; 3e9 FLOPs at 1e9 FLOP/s (3 s);
    # 0.25 MB up at 1 Mbit/s (2 s) + 0.1 s latency. Total 7.2 s.
    world = make_world(downlink_bps=2e6, latency_s=0.1)
    [outcome] = world.run_phase([TaskCost(1, bytes_down=MB // 2, flops=3e9, bytes_up=MB // 4)], {})
    assert outcome.end_s == pytest.approx(7.2)
    assert (outcome.bytes_down, outcome.bytes_up) == (MB // 2, MB // 4)


def test_battery_death_mid_compute():
    # Prepare: 5 J left; the compute stage needs 6e9 FLOPs * 1e-9 J/FLOP = 6 J over 6 s.
    world = make_world(battery_j=5.0, energy_per_flop_j=1e-9)
    # Execute
    [outcome] = world.run_phase([TaskCost(2, bytes_down=0, flops=6e9, bytes_up=0)], {})
    # Assert: 5 J last 5/6 of the 6 s stage: it dies at t = 5 s, having spent exactly 5 J.
    assert (outcome.status, outcome.reason) == ("failed", "battery")
    assert outcome.end_s == pytest.approx(5.0)
    assert outcome.energy_j == pytest.approx(5.0)
    assert world.battery_j[2] == pytest.approx(0.0)
    assert 2 not in world.available_ids()
    # The server never hears back, so the phase lasts until the deadline.
    assert world.now_s == pytest.approx(1000.0)


def test_energy_of_a_finished_task():
    # 1 MB down at 1e-6 J/B = 1 J; 2e9 FLOPs at 1e-9 J/FLOP = 2 J; 0.5 MB up at 2e-6 J/B = 1 J.
    world = make_world(battery_j=100.0, energy_per_flop_j=1e-9, energy_per_byte_down_j=1e-6,
                       energy_per_byte_up_j=2e-6)
    [outcome] = world.run_phase([TaskCost(0, bytes_down=MB, flops=2e9, bytes_up=MB // 2)], {})
    assert outcome.energy_j == pytest.approx(4.0)
    assert outcome.battery_j == pytest.approx(96.0)


def test_deadline_aborts_a_slow_device():
    # 1 MB down at 1 Mbit/s takes 8 s, but the deadline is 5 s.
    world = make_world(deadline_s=5.0)
    [outcome] = world.run_phase([TaskCost(3, bytes_down=MB, flops=0, bytes_up=0)], {})
    assert (outcome.status, outcome.reason) == ("failed", "deadline")
    assert outcome.end_s == pytest.approx(5.0)
    assert outcome.bytes_down == MB * 5 // 8


def test_device_that_goes_offline_fails_with_offline():
    # Mean online time 1 s against a 1000 s task: it leaves long before the end.
    world = make_world(mean_online_s=1.0)
    [outcome] = world.run_phase([TaskCost(0, bytes_down=125 * MB, flops=0, bytes_up=0)], {})
    assert (outcome.status, outcome.reason) == ("failed", "offline")
    assert outcome.end_s < 1000.0


def test_phase_ends_with_last_reply_when_all_succeed():
    world = make_world()
    outcomes = world.run_phase([TaskCost(0, MB, 0, 0), TaskCost(1, MB // 2, 0, 0)], {})
    assert [o.end_s for o in outcomes] == pytest.approx([8.0, 4.0])
    assert world.now_s == pytest.approx(8.0)


def test_unreachable_devices_fail_at_once_without_cost():
    world = make_world()
    outcomes = world.run_phase([], {1: "offline"})
    assert (outcomes[0].status, outcomes[0].reason, outcomes[0].energy_j) == ("failed", "offline", 0.0)


def test_availability_chain_matches_its_stationary_share():
    # mean online 3 h, offline 1 h: in the long run 75 % of devices are online.
    cls = {"name": "d", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "availability": {"mean_online_s": 3 * 3600, "mean_offline_s": 3600}}
    world = DeviceWorld(Population(PopulationSpec(devices=20_000, classes=[cls]), 0), WorldSpec(), 0)
    world.online[:] = False
    world.advance(10 * 3600)
    assert world.online.mean() == pytest.approx(0.75, abs=0.02)


def test_recharge_and_idle_drain_over_time():
    world = make_world(battery_j=100.0, recharge_power_w=0.5, idle_power_w=0.2)
    world.battery_j[:] = 10.0
    world.advance(100.0)  # net +0.3 W for 100 s
    assert np.allclose(world.battery_j, 40.0)
    world.advance(1000.0)  # capped at the capacity
    assert np.allclose(world.battery_j, 100.0)
    assert math.isinf(make_world().battery_j[0])  # mains powered


def test_flat_device_wakes_only_after_recharging_to_the_revive_share():
    # 5 J battery, flat after a task; recharging at 0.01 W it needs 0.2 * 5 J / 0.01 W = 100 s.
    world = make_world(deadline_s=6.0, battery_j=5.0, energy_per_flop_j=1e-9, recharge_power_w=0.01)
    world.run_phase([TaskCost(0, bytes_down=0, flops=6e9, bytes_up=0)], {})
    world.battery_j[0] = 0.0
    world.advance(50.0)  # 0.5 J: charged, but below the 1 J revive threshold
    assert 0 not in world.available_ids()
    world.advance(60.0)  # 1.1 J
    assert 0 in world.available_ids()
