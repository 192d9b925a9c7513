"""Telemetry: the last report of each device, stale and noisy, never the future."""
from __future__ import annotations

import numpy as np
import pytest

from fedkd.scenario import PopulationSpec, WorldSpec
from fedkd.sim.population import Population
from fedkd.sim.telemetry import Telemetry
from fedkd.sim.world import DeviceWorld, TaskCost

MB = 1_000_000


def make_world(devices: int = 3, telemetry: dict | None = None, **device) -> DeviceWorld:
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "latency_s": 0.0, "jitter_sigma": 0.0, "battery_j": 20.0, "initial_charge_min": 1.0,
           "energy_per_flop_j": 1e-9, "energy_per_byte_up_j": 0.0, "energy_per_byte_down_j": 1e-6,
           "availability": {"mean_online_s": 1e12, "mean_offline_s": 1.0}} | device
    spec = WorldSpec(round_deadline_s=5.0, telemetry=telemetry or {})
    world = DeviceWorld(Population(PopulationSpec(devices=devices, classes=[cls]), 0), spec, 0)
    world.online[:] = True
    return world


def test_a_report_stays_until_the_next_one():
    # Prepare: a full 20 J device, 1e-9 J per FLOP, 1e-6 J per byte down; 97 s have passed.
    world = make_world()
    world.advance(97.0)
    # Execute: a task of 3e9 FLOPs at 1e9 FLOP/s: 3 s and 3 J; it completes at t = 100 s.
    world.run_phase([TaskCost(0, bytes_down=0, flops=3e9, bytes_up=0)], {})
    # ... then 1 MB down at 1 Mbit/s (8 s, 1 J) is cut by the 5 s deadline: 0.625 J spent, no report.
    world.run_phase([TaskCost(0, bytes_down=MB, flops=0, bytes_up=0)], {})
    # Assert: truth is 20 - 3 - 0.625 = 16.375 J at t = 105 s; the server still sees 17 J from t = 100 s.
    assert world.battery_j[0] == pytest.approx(16.375)
    before = Telemetry(world)
    report = before.latest([0])
    assert (report.battery_j[0], report.reported_at_s[0], report.age_s[0]) == (17.0, 100.0, 5.0)
    # Its next completed task (2e9 FLOPs: 2 J, ends at 107 s) brings the news to a new view;
    # the view taken before is a snapshot and keeps what was known then.
    world.run_phase([TaskCost(0, bytes_down=0, flops=2e9, bytes_up=0)], {})
    report = Telemetry(world).latest([0])
    assert report.battery_j[0] == pytest.approx(14.375) and report.reported_at_s[0] == 107.0
    assert (before.battery_j[0], before.reported_at_s[0], before.now_s) == (17.0, 100.0, 105.0)


def test_devices_that_never_ran_a_task_show_their_enrollment():
    # Prepare: idle drain 0.1 W; no report interval.
    world = make_world(idle_power_w=0.1)
    # Execute: 50 s pass.
    world.advance(50.0)
    report = Telemetry(world).latest(np.array([2, 0]))
    # Assert: truth is 20 - 5 = 15 J; the reports are the 20 J of time 0, 50 s old, in the order asked.
    assert np.allclose(world.battery_j, 15.0)
    assert report.device_ids.tolist() == [2, 0]
    assert report.battery_j.tolist() == [20.0, 20.0] and report.age_s.tolist() == [50.0, 50.0]
    assert report.capacity_j.tolist() == [20.0, 20.0]


def test_heartbeats_at_the_report_interval():
    # Prepare: online devices report every 60 s; idle drain 0.1 W.
    world = make_world(idle_power_w=0.1, telemetry={"report_interval_s": 60.0})
    # Execute: 130 s pass in one step.
    world.advance(130.0)
    report = Telemetry(world).latest([0, 1])
    # Assert: the last heartbeat was at 120 s, with 20 - 12 = 8 J; it is 10 s old; truth is 7 J.
    assert report.reported_at_s.tolist() == [120.0, 120.0]
    assert report.battery_j == pytest.approx([8.0, 8.0]) and report.age_s.tolist() == [10.0, 10.0]
    assert world.battery_j[0] == pytest.approx(7.0)


def test_a_completed_task_reports_the_rates_it_achieved():
    # Prepare: the device's links run at half speed (a "bad" quality state).
    world = make_world(quality=[{"name": "bad", "mean_duration_s": 1e9, "bandwidth_factor": 0.5,
                                 "compute_factor": 0.5}])
    # Execute: 0.25 MB down at 0.5 Mbit/s = 4 s, 0.5e9 FLOPs at 0.5e9 FLOP/s = 1 s.
    world.run_phase([TaskCost(1, bytes_down=MB // 4, flops=0.5e9, bytes_up=0)], {})
    report = Telemetry(world).latest([1])
    # Assert
    assert report.reported_at_s[0] == 5.0
    assert (report.downlink_bps[0], report.uplink_bps[0], report.compute_flops[0]) == (5e5, 5e5, 5e8)


def test_failed_and_offline_devices_do_not_report():
    world = make_world()
    world.online[2] = False
    world.run_phase([TaskCost(0, bytes_down=MB, flops=0, bytes_up=0)], {2: "offline"})
    assert Telemetry(world).latest([0, 2]).reported_at_s.tolist() == [0.0, 0.0]


def test_noise_is_multiplicative_seeded_and_never_the_truth():
    # Prepare: 20,000 devices at 20 J, reports with log-normal noise sigma 0.1.
    def enrolled():
        world = make_world(devices=20_000, telemetry={"noise_sigma": 0.1})
        return Telemetry(world).latest(np.arange(20_000)).battery_j

    # Execute
    first, again = enrolled(), enrolled()
    # Assert: log(reported / true) has spread 0.1 and mean 0; the same seed gives the same numbers.
    log_ratio = np.log(first / 20.0)
    assert log_ratio.std() == pytest.approx(0.1, rel=0.05)
    assert abs(log_ratio.mean()) < 0.005
    assert np.array_equal(first, again)


def test_reports_are_never_from_the_future():
    world = make_world(devices=50, telemetry={"report_interval_s": 7.0}, idle_power_w=0.01)
    for step in range(5):
        world.run_phase([TaskCost(d, bytes_down=MB // 4, flops=1e9, bytes_up=0) for d in range(step, 50, 5)], {})
        world.advance(11.0)
        report = Telemetry(world).latest(np.arange(50))
        assert (report.reported_at_s <= world.now_s).all() and (report.age_s >= 0).all()
        # A charge never rises without a charger, so a report is never below the truth.
        assert (report.battery_j >= world.battery_j - 1e-5).all()


def test_population_arrays_serve_an_allocator():
    # Prepare: device 1 has half a battery and reports it through a heartbeat at 10 s.
    from fedkd.allocator import DevicePlan, plans_for

    world = make_world(telemetry={"report_interval_s": 10.0})
    world.battery_j[1] = 10.0
    world.advance(10.0)
    telemetry = Telemetry(world)

    class Spare:
        def allocate(self, server_round, device_ids, telemetry):
            return {d: DevicePlan(take_part=bool(telemetry.battery_j[d] >= 15.0)) for d in device_ids}

    # Execute
    plans = plans_for(Spare(), 1, [0, 1, 2], telemetry)
    # Assert: device 1 is spared; the arrays are indexed by device id and cannot be written.
    assert [plans[d].take_part for d in (0, 1, 2)] == [True, False, True]
    assert telemetry.reported_at_s[1] == 10.0
    with pytest.raises(ValueError):
        telemetry.battery_j[0] = 0.0


def test_reporting_does_not_change_the_world():
    # Prepare: the same world twice, one with heartbeats every 7 s; availability, quality
    # states, solar charging and idle drain all in play.
    def world(telemetry):
        cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
               "battery_j": 5.0, "idle_power_w": 0.01, "solar": {"peak_w": 0.02},
               "availability": {"mean_online_s": 60.0, "mean_offline_s": 30.0},
               "quality": [{"name": "good", "mean_duration_s": 40.0},
                           {"name": "bad", "mean_duration_s": 20.0, "bandwidth_factor": 0.2}]}
        return DeviceWorld(Population(PopulationSpec(devices=2_000, classes=[cls]), 0),
                           WorldSpec(round_deadline_s=30.0, telemetry=telemetry), 0)

    quiet, chatty = world({}), world({"report_interval_s": 7.0, "noise_sigma": 0.2})
    # Execute: the same phases and waits in both.
    for w in (quiet, chatty):
        for step in range(4):
            ids = w.available_ids()[:20]
            w.run_phase([TaskCost(int(d), MB // 8, 1e9, MB // 8) for d in ids], {})
            w.advance(100.0)
    # Assert: identical paths; only the chatty world's server heard more often.
    assert np.array_equal(quiet.online, chatty.online)
    assert np.array_equal(quiet.quality.state, chatty.quality.state)
    assert np.array_equal(quiet.battery_j, chatty.battery_j)
    assert Telemetry(chatty).reported_at_s.max() == quiet.now_s - quiet.now_s % 7.0


def test_heartbeat_inside_a_span_sees_the_right_share_online():
    # Prepare: 20,000 devices all online at 0; mean online 100 s, offline 100 s (pi = 1/2).
    world = make_world(devices=20_000, telemetry={"report_interval_s": 100.0},
                       availability={"mean_online_s": 100.0, "mean_offline_s": 100.0})
    # Execute: 150 s in one step; the only report time is 100 s, inside the span.
    world.advance(150.0)
    reported = Telemetry(world).reported_at_s == 100.0
    # Assert: P(on at 100 s | on at 0) = 1/2 + 1/2 e^{-(1/100 + 1/100) 100} = 0.5677.
    assert reported.mean() == pytest.approx(0.5 + 0.5 * np.exp(-2.0), abs=0.015)


# -- the view an allocator gets: no path to the truth, nothing to write -----------------------

def reachable(root, depth: int = 4) -> list:
    """Everything reachable from ``root`` in ``depth`` hops through instance dicts, slots,
    public attributes and properties, bound methods' ``__self__``, closures, and containers."""
    seen, found, frontier = {id(root)}, [root], [root]
    for _ in range(depth):
        following = []
        for obj in frontier:
            children = []
            if isinstance(obj, dict) or type(obj).__name__ == "mappingproxy":
                children += list(obj.keys()) + list(obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset)):
                children += list(obj)
            if isinstance(obj, (str, bytes, int, float, bool, type(None), type)):
                continue
            children += list(getattr(obj, "__dict__", {}).values())
            for klass in type(obj).__mro__:
                for slot in getattr(klass, "__slots__", ()):
                    try:
                        children.append(object.__getattribute__(obj, slot))
                    except AttributeError:
                        pass
            if not isinstance(obj, np.ndarray):  # an array's own attributes are views of itself
                for name in dir(obj):
                    if name.startswith("__"):
                        continue
                    try:
                        children.append(getattr(obj, name))
                    except Exception:  # noqa: BLE001 - a property may refuse (a field the view lacks)
                        pass
            else:
                children.append(obj.base)
            children.append(getattr(obj, "__self__", None))
            for cell in getattr(obj, "__closure__", None) or ():
                children.append(cell.cell_contents)
            for child in children:
                if id(child) not in seen:
                    seen.add(id(child))
                    found.append(child)
                    following.append(child)
        frontier = following
    return found


def test_the_view_leads_nowhere_near_the_world():
    # Prepare: a world with reports worth reading, and the simulated grid around it.
    from fedkd.sim.grid import SimulatedGrid
    from fedkd.sim.population import Population

    world = make_world(devices=5, telemetry={"report_interval_s": 10.0, "noise_sigma": 0.1})
    world.advance(25.0)
    # Execute
    view = Telemetry(world)
    found = reachable(view)
    # Assert: no world, population or grid a few hops away, and no array sharing memory with
    # the world's (its truth or its report log): the view holds copies.
    assert not [o for o in found if isinstance(o, (DeviceWorld, Population, SimulatedGrid))]
    assert not hasattr(view, "world") and not hasattr(view, "__dict__")
    truths = [world.battery_j, world.online, world.capacity_j, world.reports.reported_at_s,
              world.reports.online, *world.reports.values.values()]
    arrays = [o for o in found if isinstance(o, np.ndarray)]
    assert len(arrays) >= 7 and not any(np.shares_memory(a, t) for a in arrays for t in truths)
    assert view.reported_at_s.tolist() == [20.0] * 5 and view.now_s == 25.0


def test_the_views_arrays_and_attributes_cannot_be_written():
    world = make_world(telemetry={"report_interval_s": 10.0})
    world.advance(10.0)
    view = Telemetry(world)
    report = view.latest([0, 2])
    for name in ("battery_j", "uplink_bps", "downlink_bps", "compute_flops", "online", "reported_at_s",
                 "capacity_j"):
        array = getattr(view, name)
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[0] = array[1]
        with pytest.raises(ValueError, match="read-only"):
            getattr(report, name)[0] = getattr(report, name)[1]
    with pytest.raises(AttributeError):
        view.battery_j = np.zeros(3)
    with pytest.raises(AttributeError):
        view.world = world
    with pytest.raises(AttributeError):
        view._battery_j = np.zeros(3)
    assert world.reports.values["battery_j"].flags.writeable  # the world's own log is untouched


def test_plans_for_hands_an_allocator_a_view_even_of_a_namespace():
    # Prepare: a strategy passes a namespace that carries more than reports (here the world itself).
    from types import SimpleNamespace

    from fedkd.allocator import DevicePlan, plans_for

    world = make_world()
    given = SimpleNamespace(battery_j=np.array([10.0, 20.0, 30.0]), uplink_bps=np.full(3, 1e6),
                            compute_flops=np.full(3, 1e9), world=world)
    seen = {}

    class Peek:
        def allocate(self, server_round, device_ids, telemetry):
            seen["telemetry"] = telemetry
            return {d: DevicePlan() for d in device_ids}

    # Execute
    plans_for(Peek(), 1, [0, 1], given)
    # Assert: the allocator saw a read-only copy of the report fields, not the namespace.
    view = seen["telemetry"]
    assert isinstance(view, Telemetry) and view.battery_j.tolist() == [10.0, 20.0, 30.0]
    assert not view.battery_j.flags.writeable and given.battery_j.flags.writeable
    assert getattr(view, "downlink_bps", "absent") == "absent"
    assert not [o for o in reachable(view) if isinstance(o, DeviceWorld)]
    assert [o for o in reachable(given) if isinstance(o, DeviceWorld)]  # the walk would have found it
    # The simulated world's view is handed on as it is.
    own = Telemetry(world)
    plans_for(Peek(), 1, [0], own)
    assert seen["telemetry"] is own
