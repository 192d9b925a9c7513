"""fd (Federated Distillation, Jeong et al. 2018): per-class average logits, no public data."""
from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkd.checkpoint import decode, encode
from fedkd.codecs import decode_any, get_codec
from fedkd.contract import DeviceCall, PublicSet, StrategyEnv
from fedkd.device_models import model_key
from fedkd.registry import resolve_strategy
from fedkd.runtime.backends import run_backend
from fedkd.runtime.client import make_client_app
from fedkd.context import resolve_torch_device, simulation_context
from fedkd.protocol import COST, STATE, TASK, payload_bytes
from fedkd.runtime.server import StrategyJob, make_server_app
from fedkd.scenario import Scenario, parse_scenario
from fedkd.seeding import derive_seed
from fedkd.training import model_device, predict_logits

from .conftest import TINY
from .test_resume import resumed_after_stops

FD = resolve_strategy("fd").cls
fd = importlib.import_module(FD.__module__)

# Three devices, two classes: per-class mean logits (rows = the label) and counts.
A = (np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([3.0, 1.0]))
B = (np.array([[4.0, 2.0], [0.0, 0.0]]), np.array([1.0, 0.0]))  # holds no sample of class 1
C = (np.array([[0.0, 0.0], [1.0, 3.0]]), np.array([0.0, 2.0]))  # holds no sample of class 0


def strategy(**params) -> FD:
    s = FD(**params)
    s.fedkd_setup(StrategyEnv(public=PublicSet(size=10, num_classes=2, seed=0)))
    return s


def sent_targets(s: FD, node: int) -> tuple[np.ndarray, np.ndarray]:
    task = s._targets_of(node)
    return decode_any(task["targets"]), decode_any(task["target-counts"])


def test_the_server_averages_per_class_by_counts_and_leaves_each_devices_own_contribution_out():
    s = strategy()
    s.merge({0: A, 1: B, 2: C})
    # Over all devices: class 0 = (3 [2, 0] + 1 [4, 2]) / 4 = [10, 2] / 4 = [2.5, 0.5], 4 samples;
    # class 1 = (1 [0, 1] + 2 [1, 3]) / 3 = [2, 7] / 3, 3 samples. Device 9 did not report: it gets these.
    logits, counts = sent_targets(s, 9)
    np.testing.assert_allclose(logits, [[2.5, 0.5], [2 / 3, 7 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [4, 3])
    # Device 0 (A) without itself: class 0 = [10 - 6, 2 - 0] / (4 - 3) = [4, 2]; class 1 = [2 - 0, 7 - 1] / 2 = [1, 3].
    logits, counts = sent_targets(s, 0)
    np.testing.assert_allclose(logits, [[4, 2], [1, 3]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [1, 2])
    # Device 1 (B): class 0 = [10 - 4, 2 - 2] / 3 = [2, 0]; class 1 unchanged (B has none).
    logits, counts = sent_targets(s, 1)
    np.testing.assert_allclose(logits, [[2, 0], [2 / 3, 7 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [3, 3])
    # Device 2 (C): class 1 = [2 - 2, 7 - 6] / 1 = [0, 1].
    logits, counts = sent_targets(s, 2)
    np.testing.assert_allclose(logits, [[2.5, 0.5], [0, 1]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [4, 1])


def test_a_class_only_the_device_holds_gives_it_no_target_and_exclusion_can_be_switched_off():
    s = strategy()
    s.merge({0: A, 1: B})
    # Only A holds class 1: without A nothing is left (count 0, a zero row the device ignores).
    logits, counts = sent_targets(s, 0)
    np.testing.assert_allclose(logits, [[4, 2], [0, 0]])
    np.testing.assert_array_equal(counts, [1, 0])
    s = strategy(exclude_own=False)
    s.merge({0: A, 1: B})
    logits, counts = sent_targets(s, 0)
    np.testing.assert_allclose(logits, [[2.5, 0.5], [0, 1]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [4, 1])


def test_a_class_no_reporting_device_holds_keeps_its_last_global_logits():
    s = strategy()
    s.merge({0: A, 1: B, 2: C})
    # Next round only B reports: class 0 becomes B's own [4, 2] (1 sample), class 1 keeps [2/3, 7/3].
    s.merge({1: B})
    logits, counts = sent_targets(s, 9)
    np.testing.assert_allclose(logits, [[4, 2], [2 / 3, 7 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(counts, [1, 3])
    # B's own contribution is the latest; without it class 0 has nothing left.
    logits, counts = sent_targets(s, 1)
    np.testing.assert_array_equal(counts, [0, 3])


def test_the_device_loss_is_cross_entropy_plus_beta_times_distillation_towards_its_labels_global_logits():
    # Two samples with logits [0, 0]: cross-entropy ln 2 each. Global logits of class 0 are
    # [ln 3, 0] -> probabilities [3/4, 1/4]; class 1 has no target. Sample 0 (label 0):
    # KL([3/4, 1/4] || [1/2, 1/2]) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812;
    # sample 1 (label 1) adds nothing; per batch: 0.130812 / 2 = 0.065406.
    logits = torch.zeros(2, 2)
    labels = torch.tensor([0, 1])
    targets = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    has = torch.tensor([True, False])
    loss, distill = fd.fd_loss(logits, labels, targets, has, beta=2.0, temperature=1.0)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert float(distill) == pytest.approx(kl / 2, rel=1e-5)
    assert float(loss) == pytest.approx(math.log(2) + 2.0 * kl / 2, rel=1e-5)
    # With no targets at all: cross-entropy alone.
    loss, distill = fd.fd_loss(logits, labels, None, None, beta=2.0, temperature=1.0)
    assert float(loss) == pytest.approx(math.log(2)) and float(distill) == 0.0


def fd_call(scenario: Scenario, device_id: int, config: dict) -> DeviceCall:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    message = Message(RecordDict({"config": ConfigRecord(config),
                                  TASK: ConfigRecord({"device_id": device_id, "round": 1, "seed": scenario.seed})}),
                      1001, fd.MESSAGE_TYPE)
    return DeviceCall.of(scenario, message)


def test_the_device_uploads_the_mean_training_logits_per_class_and_its_counts(tiny_scenario):
    # Prepare: a learning rate so small the model does not move, so every training pass's
    # logits are the initial model's: the upload must be their per-class mean.
    tiny_scenario["training"]["learning_rate"] = 1e-9
    scenario = Scenario.model_validate(tiny_scenario)
    ctx = simulation_context(scenario)
    device = ctx.device(1)
    config = {"server-round": 1, "beta": 1.0, "temperature": 1.0, "codec": "fp32"}
    # Execute
    reply = fd.fd_task(fd_call(scenario, 1, config))
    # Assert
    initial = ctx.new_model(device.model_tier, modalities=device.modalities,
                            seed=fd_seed(scenario, 1, device.model_tier, device.modalities))
    logits = predict_logits(initial, device.data, device.modalities).numpy()
    labels = device.data.labels
    counts = np.bincount(labels, minlength=10)
    expected = np.array([logits[labels == c].mean(0) if counts[c] else np.zeros(10) for c in range(10)])
    np.testing.assert_allclose(decode_any(bytes(reply.content["fd"]["logits"])), expected, atol=1e-4)
    np.testing.assert_array_equal(decode_any(bytes(reply.content["fd"]["counts"])), counts)
    epochs, n = scenario.training.local_epochs, len(labels)
    assert reply.content[COST]["flops"] == ctx.train_flops_per_sample(device.model_tier, device.modalities) * n * epochs
    assert len(reply.content[STATE]) > 0  # the model travels as the device's state


def fd_seed(scenario, device_id, tier, modalities):
    """The seed of a device's initial model (fedkd.device_models.device_model)."""
    return derive_seed(scenario.seed, "device-model", device_id, model_key(tier, modalities))


# -- backend.torch_device: the device's work runs where its model is -----------------------
# This machine may have no GPU: "auto" is then the cpu, so a run asked for "auto" must give the
# "cpu" run's reply byte for byte, and every tensor is placed through model_device (spied on).
# With a GPU, "auto" is cuda: float results differ, so only the reply's shape is compared.
# (tests/test_fedproto.py, test_fedgkt.py and test_mutual_kd.py use these helpers too.)
def reply_contents(reply: Message) -> dict[str, object]:
    """What a reply carries, by record and key: bytes and numbers as they are, arrays as numpy."""
    return {f"{name}/{key}": value.numpy() if isinstance(value, Array) else value
            for name, record in reply.content.items() for key, value in record.items()}


def assert_same_reply(reply: Message, reference: Message) -> None:
    """``reply`` (a run with torch_device auto) is ``reference`` (cpu): exactly where auto is the cpu."""
    got, expected = reply_contents(reply), reply_contents(reference)
    assert got.keys() == expected.keys()
    exact = resolve_torch_device("auto").type == "cpu"
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
            assert not exact or np.array_equal(got[key], value), key
        elif isinstance(value, bytes):
            assert len(got[key]) == len(value) and (not exact or got[key] == value), key
        elif isinstance(value, float):
            assert math.isfinite(got[key]) and (not exact or got[key] == value), key
        else:
            assert got[key] == value, key


def placement_spy(module, monkeypatch) -> list[torch.device]:
    """Spy on the ``model_device`` a strategy module imported: the devices it was told, in order."""
    told: list[torch.device] = []

    def spy(model):
        told.append(model_device(model))
        return told[-1]

    monkeypatch.setattr(module, "model_device", spy)
    return told


def on_torch_device(raw: dict, torch_device: str) -> Scenario:
    return Scenario.model_validate({**copy.deepcopy(raw), "backend": {"torch_device": torch_device}})


def test_the_global_targets_come_where_they_are_asked_for():
    config = {"targets": get_codec("fp32").encode(np.array([[math.log(3), 0.0], [0.0, 0.0]], np.float32)),
              "target-counts": get_codec("fp32").encode(np.array([2.0, 0.0], np.float32))}
    probs, has = fd.global_targets(config, 2, 1.0)
    assert probs.device == has.device == torch.device("cpu")
    np.testing.assert_allclose(probs.numpy(), [[0.75, 0.25], [0.5, 0.5]], rtol=1e-6)
    assert has.tolist() == [True, False]
    assert fd.global_targets(config, 2, 1.0, torch.device("cpu"))[0].equal(probs)
    meta = fd.global_targets(config, 2, 1.0, torch.device("meta"))
    assert [t.device.type for t in meta] == ["meta", "meta"]
    assert (meta[0].shape, meta[0].dtype, meta[1].dtype) == ((2, 2), torch.float32, torch.bool)
    assert fd.global_targets({}, 2, 1.0, torch.device("meta")) == (None, None)
    with pytest.raises(ValueError, match="global logits"):
        fd.global_targets(config, 3, 1.0)


def test_the_device_task_runs_where_its_model_is(tiny_scenario, monkeypatch):
    # Prepare: targets from the server, so every tensor of the loss is in play.
    logits = np.random.default_rng(0).normal(size=(10, 10)).astype(np.float32)
    config = {"server-round": 2, "beta": 1.0, "temperature": 2.0, "codec": "fp32",
              "targets": get_codec("fp32").encode(logits),
              "target-counts": get_codec("fp32").encode(np.arange(10, dtype=np.float32) % 3)}
    told = placement_spy(fd, monkeypatch)
    # Execute
    replies = {where: fd.fd_task(fd_call(on_torch_device(tiny_scenario, where), 1, config))
               for where in ("cpu", "auto")}
    # Assert: the task asked where its model is, each time, and "auto" gave the "cpu" run's reply.
    assert told == [torch.device("cpu"), resolve_torch_device("auto")]
    assert_same_reply(replies["auto"], replies["cpu"])


def test_bad_parameters_fail_at_construction():
    for bad, match in (({"beta": -1.0}, "beta"), ({"temperature": 0.0}, "temperature"),
                       ({"codec": "gzip"}, "codec"), ({"fraction_train": 0.0}, "fraction_train")):
        with pytest.raises(ValueError, match=match):
            FD(**bad)


def test_state_round_trips_through_a_checkpoint():
    s = strategy()
    s.merge({0: A, 1: B, 2: C})
    restored = strategy()
    restored.fedkd_restore(decode(encode(s.fedkd_state())))
    for node in (0, 1, 2, 9):
        for sent, again in zip(sent_targets(s, node), sent_targets(restored, node)):
            np.testing.assert_array_equal(sent, again)


# The tests' tiny scenario with enough data and rounds for learning to show (as tests/test_learning.py).
LEARN = {**copy.deepcopy(TINY), "name": "learn", "rounds": 3, "training": {"local_epochs": 3, "batch_size": 10},
         "strategy_defaults": {"fraction_train": 1.0, "min_available_nodes": 2}}
LEARN["data"].update(partition={"label_alpha": 1.0, "samples_per_device": 100}, test_samples=300)


def test_fd_learns_and_moves_exactly_its_payloads():
    # Prepare: fp16 up (10 x 10 logits: 20 + 200 bytes), fp32 down (20 + 400 bytes); counts fp32 (20 + 40).
    scenario = parse_scenario({**LEARN, "strategies": [{"name": "fd", "params": {"codec": "fp16",
                                                                                 "downlink_codec": "fp32"}}]},
                              "learn.yaml")
    assert (get_codec("fp16").encoded_size(10, 10), get_codec("fp32").encoded_size(10, 10),
            get_codec("fp32").encoded_size(1, 10)) == (220, 420, 60)
    sink = []
    # Execute
    run_backend(scenario.backend, make_server_app(StrategyJob(scenario, scenario.strategies[0]), sink),
                make_client_app(scenario))
    # Assert: above chance (0.1) twice over, and better than round 0.
    accuracy = [r.accuracy for r in sink[0].rounds]
    assert accuracy[-1] >= 0.2 and accuracy[-1] >= accuracy[0] + 0.1, accuracy
    ctx = simulation_context(scenario)
    tasks = [d for d in sink[0].devices if d.status == "ok"]
    assert len(tasks) == 12 * 3
    for task in tasks:
        # What the device sent: the fp16 logits, the fp32 counts and its metrics, nothing else.
        up = RecordDict({"fd": ConfigRecord({"logits": bytes(220), "counts": bytes(60)}),
                         "metrics": MetricRecord({"num-examples": len(ctx.device(task.device_id).data),
                                                  "train-loss": 1.0, "distill-loss": 1.0})})
        assert task.bytes_up == payload_bytes(up)
        # What came down: the config, and from round 2 the 420 + 60 bytes of targets.
        config = {"server-round": task.round, "beta": 1.0, "temperature": 1.0, "codec": "fp16"}
        if task.round > 1:
            config |= {"targets": bytes(420), "target-counts": bytes(60)}
        assert task.bytes_down == payload_bytes(RecordDict({"config": ConfigRecord(config)}))


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    raw = copy.deepcopy(TINY)
    raw.update(rounds=3, strategy_defaults={"fraction_train": 0.5, "min_available_nodes": 2},
               strategies=[{"name": "fd"}])
    scenario = parse_scenario(raw)
    stops, uninterrupted, resumed = resumed_after_stops(scenario, tmp_path)
    assert stops == 1
    assert resumed == uninterrupted
