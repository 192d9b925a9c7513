"""Trace replay: the CSV format, its errors, and devices that follow a trace."""
from __future__ import annotations

import numpy as np
import pytest

from fedkd.errors import ScenarioError
from fedkd.scenario import PopulationSpec, WorldSpec
from fedkd.checks import load_scenario
from fedkd.sim.population import Population
from fedkd.sim.traces import TraceError, load_trace
from fedkd.sim.world import DeviceWorld, TaskCost

from .conftest import REPO

MB = 1_000_000
EXAMPLE = REPO / "scenarios" / "traces" / "example_phone_trace.csv"


def write(tmp_path, text: str, name: str = "trace.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_example_trace_loads():
    trace = load_trace(EXAMPLE)
    assert trace.devices == 3
    assert sorted(trace.values) == ["charge_w", "compute_flops", "downlink_bps", "online", "uplink_bps"]


def test_values_are_piecewise_constant(tmp_path):
    # Prepare: device 0 at 1 Mbit/s from t = 10 s (and before: the first row holds), 4 Mbit/s from 100 s.
    trace = load_trace(write(tmp_path, "time_s,device,uplink_bps\n100,0,4e6\n10,0,1e6\n0,1,2e6\n"))
    # Execute / Assert: rows may come in any order; each holds until the device's next one.
    assert trace.value("uplink_bps", np.array([0, 0, 0, 0, 1]), 0.0).tolist() == [1e6] * 4 + [2e6]
    assert trace.value("uplink_bps", np.array([0, 1]), 99.9).tolist() == [1e6, 2e6]
    assert trace.value("uplink_bps", np.array([0, 1]), 100.0).tolist() == [4e6, 2e6]
    assert trace.value("uplink_bps", np.array([0]), 1e9).tolist() == [4e6]


def test_integral_of_charge_power(tmp_path):
    # Prepare: 0 W, then 5 W from 100 s to 200 s, then 1 W.
    trace = load_trace(write(tmp_path, "time_s,charge_w\n0,0\n100,5\n200,1\n"))
    # Execute / Assert: over [50, 300]: 50 s * 0 + 100 s * 5 W + 100 s * 1 W = 600 J.
    assert trace.integral("charge_w", np.array([0]), 50.0, 300.0)[0] == pytest.approx(600.0)
    assert trace.integral("charge_w", np.array([0]), 150.0, 160.0)[0] == pytest.approx(50.0)


def test_next_offline_time(tmp_path):
    trace = load_trace(write(tmp_path, "time_s,online\n0,1\n30,0\n60,1\n"))
    assert trace.next_offline_s(0, 5.0) == 30.0
    assert trace.next_offline_s(0, 40.0) == 40.0  # offline already
    assert trace.next_offline_s(0, 60.0) == float("inf")


@pytest.mark.parametrize("text, expected", [
    ("", "is empty"),
    ("time_s,device,speed\n0,0,1\n", "unknown column 'speed'"),
    ("device,online\n0,1\n", "time_s is required"),
    ("time_s,device\n0,0\n", "no value column"),
    ("time_s,online\n", "no rows"),
    ("time_s,online\n0,1\n5,yes\n", "line 3, column online: expected a number, got 'yes'"),
    ("time_s,online\n0,2\n", "line 2, column online: expected 0 or 1"),
    ("time_s,uplink_bps\n0,-1\n", "line 2, column uplink_bps: expected a number > 0"),
    ("time_s,online\n0,1\n-5,1\n", "line 3, column time_s: expected seconds >= 0"),
    ("time_s,online\n0,1\n0,0\n", "two rows at time_s 0"),
    ("time_s,online\n0\n", "line 2: expected 2 cells"),
    ("time_s,device,online\n0,0,1\n0,2,1\n", "device 1 has no row"),
    ("time_s,device,online\n0,1.5,1\n", "column device: expected a device number"),
    ("time_s,charge_w\n0,nan\n", "expected a finite number"),
])
def test_malformed_trace_is_named(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(TraceError) as exc:
        load_trace(path)
    assert expected in str(exc.value) and path in str(exc.value)


def test_scenario_with_missing_trace_fails_at_load(write_scenario, tiny_scenario):
    tiny_scenario["population"]["classes"][0]["trace"] = "no/such/trace.csv"
    path = write_scenario(tiny_scenario)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: population.classes[0].trace: ")
    assert "trace file no/such/trace.csv not found" in message


def test_scenario_with_malformed_trace_names_file_and_line(write_scenario, tiny_scenario, tmp_path):
    trace = write(tmp_path, "time_s,online\n0,1\n10,maybe\n")
    tiny_scenario["population"]["classes"][1]["trace"] = trace
    with pytest.raises(ScenarioError) as exc:
        load_scenario(write_scenario(tiny_scenario))
    assert "population.classes[1].trace" in str(exc.value)
    assert f"trace {trace} line 3, column online" in str(exc.value)


def test_scenario_with_the_example_trace_loads(write_scenario, tiny_scenario):
    tiny_scenario["population"]["classes"][0]["trace"] = str(EXAMPLE)
    assert load_scenario(write_scenario(tiny_scenario)).population.classes[0].trace == str(EXAMPLE)


def traced_world(tmp_path, text: str, devices: int = 4, **device) -> DeviceWorld:
    cls = {"name": "phone", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "latency_s": 0.0, "jitter_sigma": 0.5, "battery_j": 100.0, "initial_charge_min": 1.0,
           "energy_per_flop_j": 0.0, "energy_per_byte_up_j": 0.0, "energy_per_byte_down_j": 0.0,
           "trace": write(tmp_path, text)} | device
    return DeviceWorld(Population(PopulationSpec(devices=devices, classes=[cls]), 0),
                       WorldSpec(round_deadline_s=1000.0), 0)


def test_replayed_bandwidth_has_no_jitter_and_devices_cycle_through_the_trace(tmp_path):
    # Prepare: trace device 0 downloads at 1 Mbit/s, trace device 1 at 2 Mbit/s; the class has
    # 4 devices, so devices 0 and 2 replay trace device 0, devices 1 and 3 trace device 1.
    world = traced_world(tmp_path, "time_s,device,downlink_bps\n0,0,1e6\n0,1,2e6\n")
    # Execute: 1 MB to each, despite jitter_sigma 0.5 on the class.
    outcomes = world.run_phase([TaskCost(d, bytes_down=MB, flops=0, bytes_up=0) for d in range(4)], {})
    # Assert: 8 s at 1 Mbit/s, 4 s at 2 Mbit/s.
    assert [o.end_s for o in outcomes] == pytest.approx([8.0, 4.0, 8.0, 4.0])


def test_replayed_offline_time_cuts_a_task(tmp_path):
    # Prepare: online until t = 5 s, offline from then on; the task would take 8 s.
    world = traced_world(tmp_path, "time_s,online\n0,1\n5,0\n", devices=1, jitter_sigma=0.0)
    assert world.online[0]
    # Execute
    [outcome] = world.run_phase([TaskCost(0, bytes_down=MB, flops=0, bytes_up=0)], {})
    # Assert: it fails offline at 5 s, having moved 5/8 of the megabyte; it stays offline.
    assert (outcome.status, outcome.reason, outcome.end_s) == ("failed", "offline", pytest.approx(5.0))
    assert outcome.bytes_down == MB * 5 // 8
    assert not world.online[0] and 0 not in world.available_ids()


def test_replayed_charge_power_fills_the_battery(tmp_path):
    # Prepare: empty 100 J battery; 0.5 W from t = 20 s to t = 60 s, nothing otherwise.
    world = traced_world(tmp_path, "time_s,charge_w\n0,0\n20,0.5\n60,0\n", devices=1,
                         recharge_power_w=1.0)  # replaced by the trace
    world.battery_j[:] = 0.0
    # Execute / Assert: 40 s * 0.5 W = 20 J.
    world.advance(100.0)
    assert world.battery_j[0] == pytest.approx(20.0)
