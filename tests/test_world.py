"""Task timelines and energy in the SimPy world, worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fedkd.report import _battery_per_round, devices_frame, rounds_frame, write_results
from fedkd.results import DeviceRecord, RoundRecord, StrategyRun
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


# -- fluctuation over simulated time ---------------------------------------------

GOOD_BAD = [{"name": "good", "mean_duration_s": 3000.0},
            {"name": "bad", "mean_duration_s": 1000.0, "bandwidth_factor": 0.5, "compute_factor": 0.25}]


def test_a_device_in_a_bad_quality_state_moves_and_computes_slower():
    # Prepare: in "bad", bandwidth x 0.5 and compute x 0.25.
    world = make_world(quality=GOOD_BAD)
    world.quality.state[:] = 1
    # Execute: 1 MB down, 1e9 FLOPs, nothing up.
    [outcome] = world.run_phase([TaskCost(0, bytes_down=MB, flops=1e9, bytes_up=0)], {})
    # Assert: 8e6 bit / 0.5e6 bit/s = 16 s, then 1e9 FLOP / 0.25e9 FLOP/s = 4 s.
    assert outcome.end_s == pytest.approx(20.0)


def test_quality_chain_spends_time_in_proportion_to_mean_durations():
    # Prepare: good lasts 3000 s on average, bad 1000 s: 3/4 of the time is good.
    cls = {"name": "d", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "quality": GOOD_BAD}
    world = DeviceWorld(Population(PopulationSpec(devices=20_000, classes=[cls]), 0), WorldSpec(), 0)
    assert (world.quality.state == 0).mean() == pytest.approx(0.75, abs=0.02)
    # Execute: everyone starts good, then 1000 s pass.
    world.quality.state[:] = 0
    world.advance(1000.0)
    # Assert: P(good | good) = pi + (1 - pi) e^{-rt}, r = 1/3000 + 1/1000 = 1/750 per s.
    expected = 0.75 + 0.25 * math.exp(-1000 / 750)
    assert (world.quality.state == 0).mean() == pytest.approx(expected, abs=0.02)


def test_diurnal_bandwidth_follows_the_hour_of_day():
    # Prepare: the clock starts at 08:00; between 8 and 9 the links run at half speed.
    factors = [1.0] * 24
    factors[8] = 0.5
    world = make_world(diurnal={"bandwidth_factor": factors})
    # Execute / Assert: at 08:00, 1 MB at 0.5 Mbit/s takes 16 s.
    [first] = world.run_phase([TaskCost(0, bytes_down=MB, flops=0, bytes_up=0)], {})
    assert first.end_s == pytest.approx(16.0)
    # An hour later (09:00:16) the same megabyte takes 8 s.
    world.advance(3600.0)
    [second] = world.run_phase([TaskCost(0, bytes_down=MB, flops=0, bytes_up=0)], {})
    assert second.end_s - second.start_s == pytest.approx(8.0)


# -- recharging by time of day -----------------------------------------------------

def world_at(start_hour: float, **device) -> DeviceWorld:
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "battery_j": 1e6, "initial_charge_min": 1.0,
           "availability": {"mean_online_s": 1e12, "mean_offline_s": 1.0}} | device
    world = DeviceWorld(Population(PopulationSpec(devices=2, classes=[cls]), 0),
                        WorldSpec(start_hour=start_hour), 0)
    world.battery_j[:] = 0.0
    return world


def test_charging_window_past_midnight():
    # Prepare: on the charger from 22:00 to 07:00 at 2 W; the clock starts at 21:00.
    world = world_at(21.0, charging_windows=[{"start_hour": 22, "end_hour": 7, "power_w": 2.0}])
    # Execute / Assert: 21:00 -> 23:00 charges one hour: 3600 s * 2 W = 7200 J.
    world.advance(2 * 3600)
    assert world.battery_j[0] == pytest.approx(7200.0)
    # 23:00 -> 09:00 charges eight more hours (until 07:00): 7200 + 8 * 7200 = 64800 J.
    world.advance(10 * 3600)
    assert world.battery_j[0] == pytest.approx(64800.0)


def test_solar_follows_a_half_sine_over_the_day():
    # Prepare: sunrise 06:00, sunset 18:00 (L = 43200 s), peak 1 W; the clock starts at 06:00.
    world = world_at(6.0, solar={"peak_w": 1.0, "sunrise_hour": 6, "sunset_hour": 18})
    # Execute: until noon. Assert: integral of sin(pi x / L) over [0, L/2] = L / pi.
    world.advance(6 * 3600)
    assert world.battery_j[0] == pytest.approx(43200 / math.pi)
    # Through the night to 06:00 the next day: the whole day's 2 L / pi, nothing after dark.
    world.advance(18 * 3600)
    assert world.battery_j[0] == pytest.approx(2 * 43200 / math.pi)


def test_a_full_battery_stores_nothing_when_its_window_closes():
    # Prepare: 100 J battery at 90 J; charger 06:00-07:00 at 1 W; idle drain 0.01 W; 06:00 now.
    world = world_at(6.0, battery_j=100.0, idle_power_w=0.01,
                     charging_windows=[{"start_hour": 6, "end_hour": 7, "power_w": 1.0}])
    world.battery_j[:] = 90.0
    # Execute: two hours pass in one step.
    world.advance(2 * 3600)
    # Assert: full (100 J) at 07:00, then 3600 s * 0.01 W = 36 J drained: 64 J, not 100 J.
    assert world.battery_j[0] == pytest.approx(64.0)


def test_battery_snapshot_covers_every_device_of_a_battery_class():
    world = make_world(battery_j=10.0)
    world.battery_j[:] = [1.0, 2.0, 3.0, 6.0]
    assert world.battery_snapshot() == {"battery_mean_j_dev": 3.0, "battery_min_j_dev": 1.0}
    assert make_world().battery_snapshot() == {}  # mains powered


# -- the world's plots --------------------------------------------------------------

def _run_with_failures(label: str, metrics: dict) -> StrategyRun:
    run = StrategyRun(label, "fedavg")
    for r in range(3):
        run.rounds.append(RoundRecord(label, r, 30.0 * r, 0.5, 0, 0, 1.0, 1, 2, 4, 0, metrics))
        for device, (status, reason, battery) in enumerate([("ok", "", 4.0), ("failed", "battery", 0.0),
                                                            ("failed", "deadline", 2.0), ("ok", "", math.inf)]):
            run.devices.append(DeviceRecord(label, r, "train", device, "mote" if device < 3 else "gateway",
                                            status, reason, 0.0, 1.0, 0, 0, 0.1, battery))
    return run


@pytest.mark.parametrize("metrics", [{}, {"battery_mean_j_mote": 3.0, "battery_min_j_mote": 0.5}],
                         ids=["from-tasks", "from-snapshot"])
def test_battery_and_dropout_plots_are_written(tmp_path, metrics):
    runs = [_run_with_failures("a", metrics), _run_with_failures("b", metrics)]
    written = write_results(tmp_path, runs, {"scenario": "t"})
    for name in ("battery.png", "dropouts.png"):
        assert tmp_path / name in written
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    per_round, _ = _battery_per_round(rounds_frame(runs), devices_frame(runs))
    # Only the battery class appears; from the tasks: mean (4 + 0 + 2) / 3 = 2 J, lowest 0 J.
    assert set(per_round["device_class"]) == {"mote"}
    expected = (3.0, 0.5) if metrics else (2.0, 0.0)
    assert (per_round["mean"].iloc[0], per_round["min"].iloc[0]) == expected
