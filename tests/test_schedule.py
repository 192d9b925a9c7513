"""Rounds on a schedule (``world.round_interval_s``), worked out by hand: the clock
moves to max(start + interval, end) between rounds and batteries idle in between."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from fedkd.cli import main
from fedkd.scenario import PopulationSpec, WorldSpec
from fedkd.sim.population import Population
from fedkd.sim.world import DeviceWorld, TaskCost


def scheduled_world(interval_s: float | None, start_hour: float = 8.0, **device) -> DeviceWorld:
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "latency_s": 0.0, "jitter_sigma": 0.0, "battery_j": 10.0, "initial_charge_min": 1.0,
           "energy_per_flop_j": 0.0, "energy_per_byte_up_j": 0.0, "energy_per_byte_down_j": 0.0,
           "availability": {"mean_online_s": 1e12, "mean_offline_s": 1.0}} | device
    world = DeviceWorld(Population(PopulationSpec(devices=1, classes=[cls]), 0),
                        WorldSpec(round_interval_s=interval_s, start_hour=start_hour, round_deadline_s=1e5), 0)
    world.online[:] = True
    world.battery_j[:] = cls["battery_j"]
    return world


def test_idle_rounds_every_fifteen_minutes_drain_by_hand():
    # Prepare: 10 J, idle draw 1 mW, rounds every 900 s that run no task.
    world = scheduled_world(900.0, idle_power_w=0.001)
    world.round_closed(0)  # the initial model's scoring: no wait, round 1 starts at t = 0
    assert world.now_s == 0.0
    # Execute: four rounds close at once.
    for r in range(1, 5):
        world.round_closed(r)
    # Assert: round 5 starts at 4 x 900 = 3600 s; 3600 s x 1 mW = 3.6 J drained: 6.4 J left.
    assert world.now_s == pytest.approx(3600.0)
    assert world.battery_j[0] == pytest.approx(6.4)


def test_a_round_that_ends_before_its_slot_waits_for_the_next_one():
    # Prepare: a task of 8 s (1 MB at 1 Mbit/s), 2e9 FLOPs at 1e-9 J/FLOP = 2 J; idle 1 mW.
    world = scheduled_world(900.0, idle_power_w=0.001, energy_per_flop_j=1e-9)
    world.round_closed(0)
    # Execute
    [outcome] = world.run_phase([TaskCost(0, bytes_down=1_000_000, flops=2e9, bytes_up=0)], {})
    world.round_closed(1)
    # Assert: the task ends at 8 + 2 = 10 s; the next round starts at 900 s. Energy: 2 J of
    # compute plus 900 s x 1 mW = 0.9 J of idle draw (drawn busy or not): 10 - 2.9 = 7.1 J.
    assert outcome.end_s == pytest.approx(10.0)
    assert world.now_s == pytest.approx(900.0)
    assert world.battery_j[0] == pytest.approx(7.1)


def test_a_round_that_overruns_its_slot_is_followed_at_once():
    # Prepare: slots of 5 s; the task takes 8 s.
    world = scheduled_world(5.0)
    world.round_closed(0)
    world.run_phase([TaskCost(0, bytes_down=1_000_000, flops=0, bytes_up=0)], {})
    # Execute / Assert: round 2 starts when round 1 ends (8 s), not at 5 s ...
    world.round_closed(1)
    assert world.now_s == pytest.approx(8.0)
    # ... and round 3 five seconds after round 2 started.
    world.round_closed(2)
    assert world.now_s == pytest.approx(13.0)


def test_without_an_interval_rounds_run_back_to_back():
    world = scheduled_world(None, idle_power_w=0.001)
    world.round_closed(0)
    world.run_phase([TaskCost(0, bytes_down=1_000_000, flops=0, bytes_up=0)], {})
    world.round_closed(1)
    assert world.now_s == pytest.approx(8.0)
    assert world.battery_j[0] == pytest.approx(10.0 - 8 * 0.001)


def test_the_schedule_survives_a_checkpoint():
    world = scheduled_world(900.0)
    world.round_closed(0)
    world.run_phase([TaskCost(0, bytes_down=1_000_000, flops=0, bytes_up=0)], {})
    state = world.get_state()  # saved mid-round: round 1 started at 0
    restored = scheduled_world(900.0)
    restored.set_state(state)
    restored.round_closed(1)
    assert restored.now_s == pytest.approx(900.0)


def test_a_battery_flat_before_sunrise_does_not_borrow_the_morning_sun():
    # Prepare: 05:00, 1 J left in a 1000 J battery, idle 1 mW; a 10 mW panel, sun 06:00-18:00
    # (L = 43200 s).
    world = scheduled_world(None, start_hour=5.0, battery_j=1000.0, idle_power_w=0.001,
                            solar={"peak_w": 0.01, "sunrise_hour": 6, "sunset_hour": 18})
    world.battery_j[:] = 1.0
    # Execute: seven hours, to noon, in one step.
    world.advance(7 * 3600)
    # Assert: flat at 05:16:40, and still empty after sunrise until the panel beats the idle draw,
    # at c = L / pi * asin(0.1) = 1377.4 s. From there to noon it gains
    # peak L / pi * cos(pi c / L) - idle (L / 2 - c).
    length, peak, idle = 43200.0, 0.01, 0.001
    c = length / math.pi * math.asin(idle / peak)
    expected = peak * length / math.pi * math.cos(math.pi * c / length) - idle * (length / 2 - c)
    assert expected == pytest.approx(116.60, abs=0.01)
    assert world.battery_j[0] == pytest.approx(expected)
    # (Clipping only at sunrise and noon would give 137.51 - 21.6 = 115.91 J.)
    assert world.flat[0]  # ran flat; it wakes at revive_fraction (0.2) x 1000 J = 200 J


def test_a_full_battery_drains_after_the_sun_falls_below_the_idle_draw():
    # Prepare: noon, full 100 J battery, idle 5 mW, 10 mW panel, sun 06:00-18:00.
    world = scheduled_world(None, start_hour=12.0, battery_j=100.0, idle_power_w=0.005,
                            solar={"peak_w": 0.01, "sunrise_hour": 6, "sunset_hour": 18})
    # Execute: to 18:00 in one step.
    world.advance(6 * 3600)
    # Assert: full until the panel drops to 5 mW at x = L - L / pi * asin(0.5) = 36000 s after
    # sunrise (16:00); from there to sunset it loses idle * 7200 - peak L / pi (1 - cos(pi/6)).
    length = 43200.0
    lost = 0.005 * 7200 - 0.01 * length / math.pi * (1 - math.cos(math.pi / 6))
    assert world.battery_j[0] == pytest.approx(100.0 - lost)


def test_a_scenario_with_an_interval_starts_rounds_on_the_schedule(tiny_scenario, write_scenario, tmp_path):
    # Prepare: three rounds every 900 s.
    tiny_scenario |= {"rounds": 3, "strategies": ["fedavg"]}
    tiny_scenario["world"]["round_interval_s"] = 900
    out = tmp_path / "out"
    # Execute
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)]) == 0
    # Assert: each round's first task starts at 0, 900 and 1800 s; each ends within its slot.
    devices, rounds = pd.read_csv(out / "devices.csv"), pd.read_csv(out / "rounds.csv")
    starts = devices.groupby("round")["start_s"].min()
    assert starts.loc[[1, 2, 3]].tolist() == pytest.approx([0.0, 900.0, 1800.0])
    ends = rounds.set_index("round")["sim_time_s"]
    assert all(starts[r] < ends[r] < starts[r] + 900 for r in (1, 2, 3))


def test_a_negative_interval_is_refused(tiny_scenario, write_scenario, capsys):
    tiny_scenario["world"]["round_interval_s"] = -1
    path = write_scenario(tiny_scenario)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "world.round_interval_s" in err
