"""The simulated grid: Flower strategies meet the device world unknowingly.

A fake ClientApp returns numbers chosen so that FedAvg's aggregate can be
worked out by hand.
"""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.supercore.task_identity import TaskIdentity

from fedkd.runtime.inprocess import InProcessGrid
from fedkd.protocol import STATE, task_of
from fedkd.scenario import PopulationSpec, WorldSpec
from fedkd.sim.grid import PopulationExhausted, SimulatedGrid
from fedkd.sim.population import Population
from fedkd.sim.recorder import RoundRecorder
from fedkd.sim.world import DeviceWorld

SEEN_CONFIGS: list[dict] = []


def fake_client(fail_device: int | None = None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        if device == fail_device:
            raise RuntimeError("sensor unplugged")
        SEEN_CONFIGS.append(dict(message.content["config"]))
        visits = message.content[STATE]["visits"].numpy() + 1 if STATE in message.content else np.ones(1)
        return Message(RecordDict({
            "arrays": ArrayRecord([np.full(2, float(device), dtype=np.float32)]),
            "metrics": MetricRecord({"num-examples": device + 1}),
            STATE: ArrayRecord({"visits": _array(visits)}),
        }), reply_to=message)

    return app


def _array(values):
    from flwr.app import Array

    return Array(np.asarray(values, dtype=np.float64))


def make_grid(client: ClientApp, devices: int = 3, **world):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "jitter_sigma": 0.0, "availability": {"mean_online_s": 1e12, "mean_offline_s": 1e-3}}
    world_ = DeviceWorld(Population(PopulationSpec(devices=devices, classes=[cls]), 0), WorldSpec(**world), 0)
    recorder = RoundRecorder("fedavg", "fedavg", world_)
    grid = SimulatedGrid(InProcessGrid(client), world_, recorder, seed=0, timeout_s=60)
    return grid, recorder


def close(recorder):
    return lambda rnd, arrays: recorder.close_round(rnd, 0.0, {}) and None


def test_fedavg_weights_replies_by_sample_count():
    # Prepare: devices 0, 1, 2 return arrays full of their id, with 1, 2, 3 examples.
    grid, recorder = make_grid(fake_client())
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    # Execute
    result = strategy.start(grid, ArrayRecord([np.zeros(2, dtype=np.float32)]), num_rounds=1,
                            evaluate_fn=close(recorder))
    # Assert: (0*1 + 1*2 + 2*3) / (1 + 2 + 3) = 8/6.
    assert np.allclose(result.arrays.to_numpy_ndarrays()[0], 8 / 6)
    assert recorder.run.rounds[-1].participants == 3
    assert recorder.run.rounds[-1].bytes_up > 0 and recorder.run.rounds[-1].sim_time_s > 0


def test_fedprox_sends_its_proximal_mu_to_the_client():
    SEEN_CONFIGS.clear()
    grid, recorder = make_grid(fake_client())
    FedProx(proximal_mu=0.25, fraction_evaluate=0.0, min_available_nodes=3).start(
        grid, ArrayRecord([np.zeros(2, dtype=np.float32)]), num_rounds=1, evaluate_fn=close(recorder))
    assert SEEN_CONFIGS and all(c["proximal-mu"] == 0.25 for c in SEEN_CONFIGS)


def test_client_exception_becomes_an_error_reply_and_the_round_goes_on():
    # Device 1 raises: FedAvg aggregates devices 0 and 2 only: (0*1 + 2*3) / 4 = 1.5.
    grid, recorder = make_grid(fake_client(fail_device=1))
    result = FedAvg(fraction_evaluate=0.0, min_available_nodes=3).start(
        grid, ArrayRecord([np.zeros(2, dtype=np.float32)]), num_rounds=1, evaluate_fn=close(recorder))
    assert np.allclose(result.arrays.to_numpy_ndarrays()[0], 1.5)
    failed = [d for d in recorder.run.devices if d.status == "failed"]
    assert [(d.device_id, d.reason) for d in failed] == [(1, "error")]


def test_device_state_travels_with_the_task_and_is_hidden_from_the_strategy():
    grid, recorder = make_grid(fake_client())
    FedAvg(fraction_evaluate=0.0, min_available_nodes=3).start(
        grid, ArrayRecord([np.zeros(2, dtype=np.float32)]), num_rounds=3, evaluate_fn=close(recorder))
    assert {d: int(s["visits"].numpy()[0]) for d, s in grid.device_state.items()} == {0: 3, 1: 3, 2: 3}


def test_device_state_travels_from_a_store_on_disk_and_each_round_is_tagged(tmp_path):
    # Prepare: a store with no cache at all, so every state the grid sends is read from its file.
    from fedkd.sim.state_store import DeviceStateStore

    store = DeviceStateStore(tmp_path / "state.sqlite", cache_mb=0)
    grid, recorder = make_grid(fake_client())
    grid.device_state = store

    def close_and_commit(rnd, arrays):
        recorder.close_round(rnd, 0.0, {})
        store.flush(rnd)
        store.checkpointed(rnd)

    # Execute
    FedAvg(fraction_evaluate=0.0, min_available_nodes=3).start(
        grid, ArrayRecord([np.zeros(2, dtype=np.float32)]), num_rounds=3, evaluate_fn=close_and_commit)
    # Assert: three visits each, one row per device (older versions pruned), written in round 3.
    assert {d: int(s["visits"].numpy()[0]) for d, s in store.items()} == {0: 3, 1: 3, 2: 3}
    assert store._db.execute("SELECT device, round FROM state ORDER BY device").fetchall() == [(0, 3), (1, 3), (2, 3)]
    assert grid.get_state()["state_round"] == 3 and "device_state" not in grid.get_state()
    store.remove()


def test_replies_reach_the_strategy_in_device_order_without_fedkd_records():
    grid, _ = make_grid(fake_client(), devices=5)
    messages = [Message(RecordDict({"arrays": ArrayRecord([np.zeros(2, dtype=np.float32)]), "config": _config()}),
                        d, "train")
                for d in (4, 0, 2)]
    replies = grid.send_and_receive(messages)
    assert [r.metadata.src_node_id for r in replies] == [0, 2, 4]
    assert all(not any(k.startswith("fedkd.") for k in r.content.keys()) for r in replies)


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord({"server-round": 1})


def test_a_strategy_waiting_for_dead_devices_stops_instead_of_hanging():
    grid, recorder = make_grid(fake_client(), wait_step_s=100.0, max_wait_s=150.0)
    grid.world.battery_j[:] = 0.0
    grid.world.capacity_j[:] = 1.0
    with pytest.raises(PopulationExhausted, match="flat battery"):
        FedAvg(fraction_evaluate=0.0, min_available_nodes=2).start(
            grid, ArrayRecord([np.zeros(2, dtype=np.float32)]), num_rounds=1, evaluate_fn=close(recorder))
    assert grid.world.now_s >= 100.0
