"""Faulty ClientApps: a task that raises, hangs or returns garbage fails with its
reason, the round goes on without it, and no NaN reaches an aggregate or a model.

Fake ClientApps as in test_grid: device d returns arrays full of d with d + 1
examples, so FedAvg over devices 0 and 2 alone gives (0*1 + 2*3) / 4 = 1.5.
"""
from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedkd.contract import StrategyEnv
from fedkd.codecs import get_codec
from fedkd.logit_exchange import PublicSet
from fedkd.runtime.inprocess import InProcessGrid
from fedkd.protocol import COST, STATE, task_of
from fedkd.scenario import PopulationSpec, WorldSpec
from fedkd.sim.grid import SimulatedGrid
from fedkd.sim.population import Population
from fedkd.sim.recorder import RoundRecorder
from fedkd.sim.world import DeviceWorld
from fedkd.strategies.fedmd import FedMD

BAD_DEVICE = 1
CLASSES = 3
RELEASE = threading.Event()  # lets a "hung" ClientApp finish once its test is over


@pytest.fixture(autouse=True)
def release_hung_clients():
    RELEASE.clear()
    yield
    RELEASE.set()


def weights_client(kind: str) -> ClientApp:
    """Devices reply as in test_grid; BAD_DEVICE misbehaves as ``kind`` says."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        bad = device == BAD_DEVICE
        if bad and kind == "raise":
            raise RuntimeError("sensor unplugged")
        if bad and kind == "hang":
            RELEASE.wait(30)
        weights = np.full(2, float(device), dtype=np.float32)
        if bad and kind == "nan_weights":
            weights[1] = np.nan
        if bad and kind == "wrong_shape":
            weights = np.full(3, float(device), dtype=np.float32)
        if bad and kind == "wrong_dtype":
            weights = weights.astype(np.float64)
        content = {
            "arrays": ArrayRecord([weights]),
            "metrics": MetricRecord({"num-examples": device + 1, "train-loss": np.nan if bad and kind == "nan_metric"
                                     else 0.5}),
            STATE: ArrayRecord({"w": Array(np.array([np.inf if bad and kind == "nan_state" else 1.0]))}),
            COST: MetricRecord({"flops": -1.0 if bad and kind == "negative_flops" else 1e6}),
        }
        if bad and kind == "no_arrays":
            del content["arrays"]
        return Message(RecordDict(content), reply_to=message)

    return app


def make_grid(client: ClientApp, devices: int = 3, timeout_s: float = 60.0, num_classes: int | None = None):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "jitter_sigma": 0.0, "availability": {"mean_online_s": 1e12, "mean_offline_s": 1e-3}}
    world = DeviceWorld(Population(PopulationSpec(devices=devices, classes=[cls]), 0), WorldSpec(), 0)
    recorder = RoundRecorder("test", "test", world)
    grid = SimulatedGrid(InProcessGrid(client), world, recorder, seed=0, timeout_s=timeout_s,
                         num_classes=num_classes)
    return grid, recorder


def close(recorder):
    return lambda rnd, arrays: recorder.close_round(rnd, 0.0, {}) and None


def failures(recorder) -> list[tuple[int, str]]:
    return [(d.device_id, d.reason) for d in recorder.run.devices if d.status == "failed"]


@pytest.mark.parametrize("kind, reason", [
    ("raise", "error"),
    ("hang", "timeout"),
    ("nan_weights", "invalid"),
    ("wrong_shape", "invalid"),
    ("wrong_dtype", "invalid"),
    ("no_arrays", "invalid"),
    ("nan_metric", "invalid"),
    ("nan_state", "invalid"),
    ("negative_flops", "invalid"),
])
def test_a_faulty_client_fails_with_its_reason_and_fedavg_averages_the_others(kind, reason):
    # Prepare: device 1 misbehaves; the hang outlasts a 0.3 s timeout.
    grid, recorder = make_grid(weights_client(kind), timeout_s=0.3)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=3, min_train_nodes=3)
    # Execute
    started = time.perf_counter()
    result = strategy.start(grid, ArrayRecord([np.zeros(2, dtype=np.float32)]), num_rounds=2,
                            evaluate_fn=close(recorder))
    # Assert: both rounds ran on devices 0 and 2: (0*1 + 2*3) / (1 + 3) = 1.5, finite.
    aggregate = result.arrays.to_numpy_ndarrays()[0]
    assert aggregate.dtype == np.float32 and np.array_equal(aggregate, [1.5, 1.5])
    assert [r.round for r in recorder.run.rounds] == [0, 1, 2]
    assert failures(recorder) == [(BAD_DEVICE, reason)] * 2
    assert [r.participants for r in recorder.run.rounds[1:]] == [2, 2]
    # No NaN in what devices keep: the bad device's state was never stored.
    assert sorted(grid.device_state) == [0, 2]
    assert time.perf_counter() - started < 10


def test_a_hung_client_makes_the_server_wait_for_the_deadline_not_forever():
    # Prepare
    grid, recorder = make_grid(weights_client("hang"), timeout_s=0.2)
    message = Message(RecordDict({"arrays": ArrayRecord([np.zeros(2, dtype=np.float32)]),
                                  "config": ConfigRecord({"server-round": 1})}), BAD_DEVICE, "train")
    # Execute
    [reply] = grid.send_and_receive([message])
    # Assert: an error reply naming the timeout; the simulated phase lasted until the deadline,
    # as for any reply that never comes.
    assert reply.has_error() and reply.error.reason.startswith("fedkd: timeout")
    assert grid.world.now_s == WorldSpec().round_deadline_s


def test_inprocess_grid_gives_up_on_a_call_after_its_timeout():
    # Prepare
    app = weights_client("hang")
    grid = InProcessGrid(app)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    from fedkd.protocol import with_task

    content = with_task(RecordDict({"arrays": ArrayRecord([np.zeros(2, dtype=np.float32)])}), BAD_DEVICE, 1, 0)
    message = Message(content, grid.get_node_ids()[0], "train")
    # Execute
    started = time.perf_counter()
    [reply] = grid.send_and_receive([message], timeout=0.1)
    # Assert
    assert time.perf_counter() - started < 5
    assert reply.error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE and "timeout" in reply.error.reason


def fp32_payload(rows: int, cols: int, value: float) -> bytes:
    return get_codec("fp32").encode(np.full((rows, cols), value, dtype=np.float32))


def logits_client(kind: str) -> ClientApp:
    """Device d sends logits full of d; BAD_DEVICE sends garbage of the given kind."""
    app = ClientApp()

    @app.train("logits")
    def train(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        rows = len(message.content["config"]["public-indices"])
        payload = fp32_payload(rows, CLASSES, float(device))
        if device == BAD_DEVICE:
            if kind == "nan_logits":  # a well-formed fp32 payload whose last value is NaN
                payload = payload[:-4] + struct.pack("<f", np.nan)
            elif kind == "wrong_shape":
                payload = fp32_payload(rows + 1, CLASSES, 1.0)
            elif kind == "wrong_classes":
                payload = fp32_payload(rows, CLASSES + 2, 1.0)
            elif kind == "corrupt":
                payload = b"FKD garbage"
        return Message(RecordDict({
            "logits": ConfigRecord({"payload": payload}),
            "metrics": MetricRecord({"num-examples": device + 1, "train-loss": 0.5, "distill-loss": 0.0}),
        }), reply_to=message)

    return app


@pytest.mark.parametrize("kind", ["nan_logits", "wrong_shape", "wrong_classes", "corrupt"])
def test_garbage_logits_fail_as_invalid_and_never_reach_the_targets(kind):
    # Prepare
    grid, recorder = make_grid(logits_client(kind), num_classes=CLASSES)
    strategy = FedMD(fraction_train=1.0, min_train_nodes=3, min_available_nodes=3, public_batch=4)
    strategy.fedkd_setup(StrategyEnv(public=PublicSet(size=10, num_classes=CLASSES, seed=0)))
    # Execute
    strategy.start(grid, ArrayRecord(), num_rounds=1, evaluate_fn=close(recorder))
    # Assert: the consensus of devices 0 and 2 (logits all 0 and all 2: uniform probabilities).
    assert failures(recorder) == [(BAD_DEVICE, "invalid")]
    assert strategy.targets.shape == (4, CLASSES) and np.isfinite(strategy.targets).all()
    assert np.allclose(strategy.targets, 1 / CLASSES)


@pytest.mark.parametrize("values", [
    np.arange(6, dtype=np.float32).reshape(2, 3),
    np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
    np.array([np.nan, 1.0, np.inf], dtype=np.float16),
    np.zeros((0, 3), dtype=np.float32),
    np.array(3.5),
    np.arange(5, dtype=np.int64),
])
def test_arrays_read_in_place_equal_flowers_reading(values):
    from flwr.app import Array

    from fedkd.protocol import array_numpy

    read = array_numpy(Array(values))
    assert read.dtype == values.dtype
    # Exactly what Flower's own reader gives, Fortran order and all.
    assert np.array_equal(read, Array(values).numpy(), equal_nan=True) and read.shape == values.shape
