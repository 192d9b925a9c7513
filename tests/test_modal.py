"""fedavg_modal and fedprox_modal: each device moves only its own sensors' encoders and the head.

Through the simulated grid with a fake ClientApp whose numbers make the
per-parameter average computable by hand, then on a tiny real run.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedkd.checkpoint import CheckpointStore
from fedkd.data.base import ModalitySpec
from fedkd.models.multimodal import build_model
from fedkd.registry import resolve_strategy
from fedkd.report import devices_frame, rounds_frame
from fedkd.runner import run_scenario
from fedkd.context import simulation_context
from fedkd.runtime.inprocess import InProcessGrid
from fedkd.protocol import task_of
from fedkd.scenario import PopulationSpec, WorldSpec, parse_scenario
from fedkd.sim.grid import NodeProfile, SimulatedGrid
from fedkd.sim.population import Population
from fedkd.sim.recorder import RoundRecorder
from fedkd.sim.world import DeviceWorld
from fedkd.strategies.fedavg_modal import FedAvgModal, modality_of
from fedkd.strategies.fedprox_modal import FedProxModal

from .conftest import TINY
from .test_grid import close

CAMERA = ModalitySpec("camera", (1, 4, 4), "image")
SENSOR = ModalitySpec("sensor", (2, 8), "series")

SENT: dict[int, RecordDict] = {}  # device -> what the strategy sent it (its last task)


def filled_client(values: dict[int, dict[str, float]], examples: dict[int, int],
                  losses: dict[int, float] | None = None, fail: set[int] = frozenset()) -> ClientApp:
    """Device d returns every array it was sent filled with ``values[d][part]``, where part is the
    encoder's modality or "head", and reports ``examples[d]`` examples; devices in ``fail`` raise."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        SENT[device] = message.content
        if device in fail:
            raise RuntimeError("sensor unplugged")
        out = {name: Array(np.full(array.shape, values[device][modality_of(name) or "head"], dtype=np.float32))
               for name, array in message.content["arrays"].items()}
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord(
            {"num-examples": examples[device], "train-loss": (losses or {}).get(device, 0.0)})}),
            reply_to=message)

    return app


def echo_client() -> ClientApp:
    """Returns the arrays it was sent, unchanged, from 10 examples."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        SENT[int(task_of(message)["device_id"])] = message.content
        return Message(RecordDict({"arrays": message.content["arrays"],
                                   "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.0})}),
                       reply_to=message)

    return app


def run_modal(strategy, client: ClientApp, senses: dict[int, tuple[str, ...]], initial: ArrayRecord):
    """One round on devices 0..n-1 (always online, no jitter), device d sensing ``senses[d]``."""
    SENT.clear()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "jitter_sigma": 0.0, "availability": {"mean_online_s": 1e12, "mean_offline_s": 1e-3}}
    world = DeviceWorld(Population(PopulationSpec(devices=len(senses), classes=[cls]), 0), WorldSpec(), 0)
    recorder = RoundRecorder("modal", "modal", world)
    grid = SimulatedGrid(InProcessGrid(client), world, recorder, seed=0, timeout_s=60,
                         describe=lambda d: NodeProfile(d, "dev", "small", senses[d]))
    result = strategy.start(grid, initial, num_rounds=1, evaluate_fn=close(recorder))
    return result, recorder


def toy_global(**values: float) -> ArrayRecord:
    """A global model of two-element arrays: ``camera=0.0`` gives encoders.camera.w, ``head`` head.w."""
    return ArrayRecord({("head.w" if part == "head" else f"encoders.{part}.w"): Array(np.full(2, v, np.float32))
                        for part, v in values.items()})


def value(arrays: ArrayRecord, name: str) -> np.ndarray:
    return arrays[name].numpy()


def settings(devices: int) -> dict:
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=devices, min_available_nodes=devices)


# -- aggregation, by hand --------------------------------------------------------------

def test_each_parameter_is_averaged_over_the_devices_that_returned_it():
    # Prepare: device 0 has a camera only and 10 examples; it returns camera = 1, head = 1 (loss 0.4).
    # Device 1 has camera + sensor and 30 examples; it returns camera = 3, sensor = 5, head = 2 (loss 0.8).
    # The global model also has a radar encoder (9) that no device has.
    senses = {0: ("camera",), 1: ("camera", "sensor")}
    client = filled_client(values={0: {"camera": 1.0, "head": 1.0},
                                   1: {"camera": 3.0, "sensor": 5.0, "head": 2.0}},
                           examples={0: 10, 1: 30}, losses={0: 0.4, 1: 0.8})
    initial = toy_global(camera=0.0, sensor=7.0, radar=9.0, head=0.0)
    # Execute
    result, recorder = run_modal(FedAvgModal(**settings(2)), client, senses, initial)
    # Assert:
    # camera: both returned it: (10 * 1 + 30 * 3) / (10 + 30) = 100 / 40 = 2.5
    # sensor: only device 1 returned it, so its weight is 30 / 30: 5.0 (not 30 * 5 / 40 = 3.75)
    # head:   both: (10 * 1 + 30 * 2) / 40 = 70 / 40 = 1.75
    # radar:  nobody returned it: the global 9.0 stays
    arrays = result.arrays
    assert list(arrays.keys()) == list(initial.keys())  # the global model keeps every parameter, in order
    assert value(arrays, "encoders.camera.w") == pytest.approx([2.5, 2.5])
    assert value(arrays, "encoders.sensor.w") == pytest.approx([5.0, 5.0])
    assert value(arrays, "head.w") == pytest.approx([1.75, 1.75])
    assert value(arrays, "encoders.radar.w") == pytest.approx([9.0, 9.0])
    # Flower's metric aggregation is untouched: train-loss (10 * 0.4 + 30 * 0.8) / 40 = 28 / 40 = 0.7.
    assert result.train_metrics_clientapp[1]["train-loss"] == pytest.approx(0.7)
    assert recorder.run.rounds[-1].participants == 2


def test_an_encoder_whose_only_holder_drops_out_keeps_its_global_value():
    # Prepare: as above, but device 1 (the only one with a sensor) fails its task.
    senses = {0: ("camera",), 1: ("camera", "sensor")}
    client = filled_client(values={0: {"camera": 1.0, "head": 1.0},
                                   1: {"camera": 3.0, "sensor": 5.0, "head": 2.0}},
                           examples={0: 10, 1: 30}, fail={1})
    initial = toy_global(camera=0.0, sensor=7.0, head=0.0)
    # Execute
    result, recorder = run_modal(FedAvgModal(**settings(2)), client, senses, initial)
    # Assert: camera and head are device 0's alone (10 / 10: 1.0); the sensor encoder stays at 7.0.
    assert value(result.arrays, "encoders.camera.w") == pytest.approx([1.0, 1.0])
    assert value(result.arrays, "head.w") == pytest.approx([1.0, 1.0])
    assert value(result.arrays, "encoders.sensor.w") == pytest.approx([7.0, 7.0])
    assert [(d.device_id, d.status) for d in recorder.run.devices] == [(0, "ok"), (1, "failed")]


# -- what each device downloads ---------------------------------------------------------

@pytest.mark.parametrize("cls", [FedAvgModal, FedProxModal])
def test_each_device_downloads_only_its_own_encoders_and_the_head(cls):
    # Prepare: the real multimodal network (camera and sensor encoders, a head); device 0 is a
    # sensor-only mote, device 1 a camera, device 2 has both. Devices return what they were sent.
    model = build_model([CAMERA, SENSOR], num_classes=2, tier="tiny", seed=0)
    names = list(model.state_dict())
    initial = ArrayRecord(model.state_dict())
    senses = {0: ("sensor",), 1: ("camera",), 2: ("camera", "sensor")}
    params = settings(3) | ({"proximal_mu": 0.5} if cls is FedProxModal else {})
    # Execute
    result, recorder = run_modal(cls(**params), echo_client(), senses, initial)
    # Assert: the mote gets the sensor encoder and the head, never a camera key; the camera the
    # reverse; the device with both the whole model.
    received = {d: list(content["arrays"].keys()) for d, content in SENT.items()}
    assert received[0] == [n for n in names if n.startswith(("encoders.sensor.", "head."))]
    assert not any(n.startswith("encoders.camera.") for n in received[0])
    assert received[1] == [n for n in names if n.startswith(("encoders.camera.", "head."))]
    assert received[2] == names
    assert any(n.startswith("head.") for n in received[0]) and any(n.startswith("head.") for n in received[1])
    # Bytes follow: the mote downloads least, the device with both sensors what plain FedAvg sends.
    down = {d.device_id: d.bytes_down for d in recorder.run.devices}
    assert down[0] < down[2] and down[1] < down[2]
    # Echoed weights average back to the same global model (up to float32 rounding), every encoder kept.
    assert list(result.arrays.keys()) == names
    for name in names:
        assert np.allclose(result.arrays[name].numpy(), initial[name].numpy(), rtol=1e-6, atol=1e-7)
    # FedProx's proximal-mu reaches the devices in the train config.
    if cls is FedProxModal:
        assert all(content["config"]["proximal-mu"] == 0.5 for content in SENT.values())


def test_registered_as_weight_sharing_strategies():
    for name, cls in (("fedavg_modal", FedAvgModal), ("fedprox_modal", FedProxModal)):
        ref = resolve_strategy(name)
        assert ref.cls is cls and ref.shares_weights is True
        assert ref.description.startswith(("FedAvg, modality-wise", "FedProx, modality-wise"))


# -- a tiny real run ------------------------------------------------------------------------

def tiny_run(rounds: int) -> dict:
    """The tiny scenario: phones sense audio only, cameras images only. Three local epochs
    at a higher learning rate so that a few rounds learn visibly (chance is 0.1)."""
    raw = copy.deepcopy(TINY)
    raw["rounds"] = rounds
    raw["training"].update(local_epochs=3, learning_rate=0.01)
    raw["strategies"] = ["fedavg", "fedavg_modal"]
    return raw


def mean_train_bytes(run, device_class: str) -> tuple[float, float]:
    rows = [d for d in run.devices if d.phase == "train" and d.status == "ok" and d.device_class == device_class]
    assert rows, f"no completed training task of a {device_class}"
    return np.mean([d.bytes_down for d in rows]), np.mean([d.bytes_up for d in rows])


def test_tiny_run_moves_fewer_bytes_per_single_sensor_device_and_still_learns():
    # Prepare
    scenario = parse_scenario(tiny_run(rounds=4))
    params = {name: t.numel() for name, t in simulation_context(scenario).new_model("small").state_dict().items()}
    # Execute
    fedavg, modal = run_scenario(scenario)
    # Assert: per completed training task of the same device class, fewer bytes each way.
    # A phone (audio only) no longer moves the image encoder, a camera no longer the audio encoder;
    # the saving is about the share of the parameters it skips (the rest is Flower's framing).
    for device_class, own in (("phone", "audio"), ("camera", "image")):
        full_down, full_up = mean_train_bytes(fedavg, device_class)
        down, up = mean_train_bytes(modal, device_class)
        assert down < full_down and up < full_up
        kept = sum(n for name, n in params.items() if modality_of(name) in (None, own)) / sum(params.values())
        assert down / full_down == pytest.approx(kept, abs=0.03)
        assert up / full_up == pytest.approx(kept, abs=0.03)
    # The same devices trained in both runs (same seed, same sampling), so the rounds compare.
    assert [r.participants for r in modal.rounds] == [r.participants for r in fedavg.rounds]
    # Its global model learns: from about chance (0.1) at round 0 to at least twice chance.
    accuracy = [r.accuracy for r in modal.rounds]
    assert accuracy[-1] >= 0.2 and accuracy[-1] >= accuracy[0] + 0.1, accuracy


class Stop(BaseException):  # a kill's stand-in: not an error the run reports
    """Raised from the progress hook: the run stops right after a round's checkpoint."""


def test_a_stopped_modal_run_resumes_to_the_same_results(tmp_path):
    # Prepare: the global ArrayRecord is all fedavg_modal keeps between rounds (what a checkpoint saves).
    raw = tiny_run(rounds=2)
    raw["strategies"] = ["fedavg_modal", {"name": "fedprox_modal", "params": {"proximal_mu": 0.1}}]
    scenario = parse_scenario(raw)
    uninterrupted = run_scenario(scenario)
    store = CheckpointStore(tmp_path, scenario)

    def stop_after_round_1(label, record, total):
        if record.round == 1:
            raise Stop(label)

    # Execute: stop each strategy after round 1 and resume it.
    stops, resume = 0, False
    while True:
        try:
            resumed = run_scenario(scenario, stop_after_round_1, store, resume=resume)
            break
        except Stop:
            stops, resume = stops + 1, True
    # Assert
    assert stops == 2
    csv = lambda runs: (rounds_frame(runs).to_csv(index=False), devices_frame(runs).to_csv(index=False))  # noqa: E731
    assert csv(resumed) == csv(uninterrupted)
