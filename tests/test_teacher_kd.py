"""teacher_kd: a pretrained teacher labels the devices' unlabeled shards; students learn from it alone."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedkd.cli import main
from fedkd.codecs import decode_any
from fedkd.data.base import ModalitySpec
from fedkd.models import build_model
from fedkd.runtime.inprocess import InProcessGrid
from fedkd.protocol import COST, STATE, TASK, task_of
from fedkd.context import simulation_context
from fedkd.contract import DeviceCall
from fedkd.strategies.teacher_kd.device import teach_task
from fedkd.scenario import PopulationSpec, Scenario, WorldSpec
from fedkd.sim.grid import NodeProfile, SimulatedGrid
from fedkd.sim.population import Population
from fedkd.sim.recorder import RoundRecorder
from fedkd.sim.world import DeviceWorld
from fedkd.strategies.teacher_kd import TeacherKD

from .test_grid import close

CAMERA = ModalitySpec("camera", (1, 4, 4), "image")
SENSOR = ModalitySpec("sensor", (2, 8), "series")
SENSES = {0: ("camera",), 1: ("sensor",), 2: ("camera", "sensor")}
RECEIVED: dict[int, Message] = {}


def teacher_with_bias(bias: list[float]):
    """A tiny two-class teacher whose weights are all zero but the head's bias:
    every encoder outputs ReLU(0) = 0, so every sample gets logits ``bias``."""
    teacher = build_model((CAMERA, SENSOR), 2, "tiny", seed=0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
        teacher.head.bias.copy_(torch.tensor(bias))
    return teacher


def fake_client() -> ClientApp:
    """Device d uploads d + 1 camera samples and reports kd-loss 0.3 (d + 1) on d + 1 examples."""
    app = ClientApp()

    @app.query("teacher")
    def query(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        return Message(RecordDict({"samples": ArrayRecord(
            {"camera": Array(np.ones((device + 1, 1, 4, 4), dtype=np.float32))})}), reply_to=message)

    @app.train("teacher")
    def train(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        RECEIVED[device] = message
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": device + 1,
                                                            "kd-loss": 0.3 * (device + 1)})}), reply_to=message)

    return app


def profiled_grid(client: ClientApp):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "jitter_sigma": 0.0, "availability": {"mean_online_s": 1e12, "mean_offline_s": 1e-3}}
    world = DeviceWorld(Population(PopulationSpec(devices=3, classes=[cls]), 0), WorldSpec(), 0)
    recorder = RoundRecorder("teacher_kd", "teacher_kd", world)
    grid = SimulatedGrid(InProcessGrid(client), world, recorder, seed=0, timeout_s=60,
                         describe=lambda d: NodeProfile(d, "dev", "tiny", SENSES[d]))
    return grid, recorder


def run_round(strategy: TeacherKD):
    RECEIVED.clear()
    grid, recorder = profiled_grid(fake_client())
    result = strategy.start(grid, ArrayRecord(), num_rounds=1, evaluate_fn=close(recorder))
    return result, recorder


def test_device_mode_sends_each_device_the_teacher_encoders_it_can_feed():
    # Prepare: a camera-only teacher; device 1 senses only the sensor, so it cannot be taught.
    strategy = TeacherKD(fraction_train=1.0, min_available_nodes=3, teacher_at="device", temperature=2.0)
    strategy.set_teacher(teacher_with_bias([0.0, 0.0]), ("camera",))
    # Execute
    result, recorder = run_round(strategy)
    # Assert: devices 0 and 2 get the camera encoder and the head, tiny tier:
    # conv 1->8 3x3: 8*9 + 8 = 80; conv 8->16 3x3: 16*8*9 + 16 = 1168; linear 9*16 -> 16: 144*16 + 16 = 2320;
    # head 16 -> 2: 34. 3602 floats, 14,408 bytes, sent to each device every round.
    assert sorted(RECEIVED) == [0, 2]
    sent = RECEIVED[0].content["teacher"]
    assert all(k.startswith(("encoders.camera.", "head.")) for k in sent.keys())
    assert sum(a.numpy().size for a in sent.values()) == 3602
    assert RECEIVED[2].content["config"]["teacher-modalities"] == ["camera"]
    tasks = [d for d in recorder.run.devices if d.phase == "train"]
    assert [d.device_id for d in tasks] == [0, 2]
    assert all(14_408 < d.bytes_down < 14_408 + 4_000 for d in tasks)  # + record and config overhead
    # kd-loss weighted by examples: (0.3 * 1 * 1 + 0.9 * 3) / (1 + 3) = 3.0 / 4 = 0.75.
    assert result.train_metrics_clientapp[1]["kd-loss"] == pytest.approx(0.75)
    assert result.train_metrics_clientapp[1]["num-examples"] == 4


def test_edge_mode_labels_the_uploaded_samples_and_sends_back_soft_labels_only():
    # Prepare: the teacher outputs logits [2 ln 3, 0] for every sample; at T = 2 that is
    # softmax([ln 3, 0]) = [3/4, 1/4].
    strategy = TeacherKD(fraction_train=1.0, min_available_nodes=3, teacher_at="edge", temperature=2.0)
    strategy.set_teacher(teacher_with_bias([2 * math.log(3), 0.0]), ("camera", "sensor"))
    # Execute
    _, recorder = run_round(strategy)
    # Assert: device d uploaded d + 1 samples and gets d + 1 rows of [0.75, 0.25]; no weights go down.
    for device in (0, 1, 2):
        message = RECEIVED[device]
        assert "teacher" not in message.content
        labels = decode_any(bytes(message.content["config"]["soft-labels"]))
        np.testing.assert_allclose(labels, np.tile([0.75, 0.25], (device + 1, 1)), rtol=1e-6)
    queries = {d.device_id: d for d in recorder.run.devices if d.phase == "query"}
    # 16 floats per camera sample: (d + 1) * 64 bytes of raw pixels go up in the first leg.
    assert all(queries[d].bytes_up >= (d + 1) * 64 for d in (0, 1, 2))
    assert recorder.run.rounds[-1].participants == 3  # the query leg is not a second participation


def test_bad_parameters_fail_at_construction():
    with pytest.raises(ValueError, match="teacher_at"):
        TeacherKD(teacher_at="cloud")
    with pytest.raises(ValueError, match="codec"):
        TeacherKD(codec="gzip")


@pytest.fixture
def tiny(tiny_scenario) -> Scenario:
    return Scenario.model_validate(tiny_scenario)


def teacher_task(scenario: Scenario, device_id: int) -> Message:
    """A train.teacher task as the grid would deliver it, with a fixed tiny teacher over the device's sensors."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ctx = simulation_context(scenario)
    reads = ctx.device(device_id).modalities
    teacher = ctx.new_model("tiny", seed=11, modalities=reads)
    return Message(RecordDict({
        "teacher": ArrayRecord(teacher.state_dict()),
        "config": ConfigRecord({"server-round": 1, "temperature": 2.0, "teacher-tier": "tiny",
                                "teacher-modalities": list(reads)}),
        TASK: ConfigRecord({"device_id": device_id, "round": 1, "seed": scenario.seed}),
    }), 1001, "train.teacher")


def with_labels(monkeypatch, scenario: Scenario, relabel) -> None:
    ctx = simulation_context(scenario)
    real = type(ctx).device

    def device(self, device_id):
        view = real(self, device_id)
        data = dataclasses.replace(view.data, labels=relabel(view.data.labels))
        return dataclasses.replace(view, data=data)

    monkeypatch.setattr(ctx, "device", device.__get__(ctx))


@pytest.mark.parametrize("relabel", [lambda y: np.random.default_rng(0).permutation(y),
                                     lambda y: np.full_like(y, 99)], ids=["permuted", "nonsense"])
def test_the_student_never_reads_its_labels(tiny, monkeypatch, relabel):
    # Prepare: device 1's task, once with its true labels, once with permuted or impossible ones.
    honest = teach_task(DeviceCall(simulation_context(tiny), teacher_task(tiny, 1)))
    with_labels(monkeypatch, tiny, relabel)
    # Execute
    relabelled = teach_task(DeviceCall(simulation_context(tiny), teacher_task(tiny, 1)))
    # Assert: the same student to the last bit, the same loss.
    for (k, a), (_, b) in zip(honest.content[STATE].items(), relabelled.content[STATE].items()):
        assert np.array_equal(a.numpy(), b.numpy()), k
    assert honest.content["metrics"]["kd-loss"] == relabelled.content["metrics"]["kd-loss"]


def test_device_mode_flops_are_the_teachers_forward_plus_the_students_training(tiny):
    ctx = simulation_context(tiny)
    device = ctx.device(1)
    n, epochs = len(device.data), tiny.training.local_epochs
    reply = teach_task(DeviceCall(simulation_context(tiny), teacher_task(tiny, 1)))
    teacher = ctx.forward_flops_per_sample("tiny", device.modalities) * n
    student = ctx.train_flops_per_sample(device.model_tier, device.modalities) * n * epochs
    assert reply.content[COST]["flops"] == teacher + student
    assert reply.content["metrics"]["num-examples"] == n


def test_teacher_kd_runs_in_both_modes_and_moves_what_each_mode_says(write_scenario, tiny_scenario, tmp_path):
    tiny_scenario["population"]["classes"][0]["model_tier"] = "tiny"
    tiny_scenario["strategy_defaults"] = {"fraction_train": 0.5, "min_available_nodes": 2}
    tiny_scenario["strategies"] = [
        {"name": "teacher_kd", "label": label, "params": {"teacher_at": where, "teacher_epochs": 1,
                                                          "teacher_tier": "tiny"}}
        for label, where in (("at_device", "device"), ("at_edge", "edge"))]
    out = tmp_path / "tkd"
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    assert {"accuracy_teacher", "accuracy_teacher_audio", "accuracy_teacher_image",
            "accuracy_tier_tiny", "accuracy_tier_small"} <= set(rounds.columns)
    # The teacher is trained once: its score is the same every round.
    assert rounds.groupby("strategy")["accuracy_teacher"].nunique().tolist() == [1, 1]
    # With fp32 soft labels, labelling at the edge or on the device teaches the very same students.
    by_mode = rounds.set_index(["strategy", "round"])["accuracy"]
    assert by_mode["at_edge"].tolist() == by_mode["at_device"].tolist()
    devices = pd.read_csv(out / "devices.csv")
    ok = devices[devices["status"] == "ok"]
    at_device, at_edge = ok[ok["strategy"] == "at_device"], ok[ok["strategy"] == "at_edge"]
    # At the device, the teacher's image encoder alone is 3,568 floats (14,272 bytes) with the head's 170;
    # at the edge, only 10 soft labels per sample come down, and the raw samples go up.
    assert at_device[at_device["device_class"] == "camera"]["bytes_down"].min() > 4 * (3_568 + 170)
    assert set(at_edge["phase"]) == {"query", "train"}
    edge_train = at_edge[at_edge["phase"] == "train"]
    assert edge_train["bytes_down"].max() < at_device["bytes_down"].min()
    assert at_edge[at_edge["phase"] == "query"]["bytes_up"].min() > at_device["bytes_up"].max()
