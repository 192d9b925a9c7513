"""fedproto (FedProto, Tan et al. 2022): class prototypes, no public data, heterogeneous models."""
from __future__ import annotations

import copy
import importlib
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkd.checkpoint import decode, encode
from fedkd.codecs import decode_any, get_codec
from fedkd.contract import DeviceCall, PublicSet, StrategyEnv
from fedkd.device_models import device_model
from fedkd.registry import resolve_strategy
from fedkd.runtime.backends import run_backend
from fedkd.runtime.client import make_client_app
from fedkd.context import resolve_torch_device, simulation_context
from fedkd.protocol import COST, STATE, TASK, payload_bytes
from fedkd.runtime.server import StrategyJob, make_server_app
from fedkd.scenario import Scenario, parse_scenario
from fedkd.training import to_tensors

from .conftest import TINY
from .test_resume import resumed_after_stops
from .test_fd import assert_same_reply, on_torch_device, placement_spy

FedProto = resolve_strategy("fedproto").cls
fedproto = importlib.import_module(FedProto.__module__)

# Two classes. Devices A and B have 2-d features, D a 3-d one (another model tier).
A = (np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([1.0, 3.0]))
B = (np.array([[3.0, 4.0], [0.0, 0.0]]), np.array([3.0, 0.0]))  # holds no sample of class 1
D = (np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]), np.array([2.0, 0.0]))


def strategy(**params) -> FedProto:
    s = FedProto(**params)
    s.fedkd_setup(StrategyEnv(public=PublicSet(size=10, num_classes=2, seed=0)))
    return s


def test_global_prototypes_are_count_weighted_means_per_class_grouped_by_feature_dimension():
    s = strategy()
    s.merge([A, B, D])
    # 2-d group: class 0 = (1 [1, 0] + 3 [3, 4]) / 4 = [10, 12] / 4 = [2.5, 3]; class 1 = A's [0, 2].
    np.testing.assert_allclose(s.prototypes[2], [[2.5, 3.0], [0.0, 2.0]])
    np.testing.assert_array_equal(s.counts[2], [4, 3])
    # 3-d group: D alone; nobody there holds class 1 (count 0: no prototype).
    np.testing.assert_allclose(s.prototypes[3], [[1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(s.counts[3], [2, 0])
    # Each device gets its group's prototypes (and their counts), through the codecs.
    task = s._prototypes_for(2)
    np.testing.assert_allclose(decode_any(task["prototypes"]), [[2.5, 3.0], [0.0, 2.0]])
    np.testing.assert_array_equal(decode_any(task["prototype-counts"]), [4, 3])
    assert s._prototypes_for(5) == {}  # a group nobody has reported in gets nothing yet


def test_a_class_no_reporting_device_holds_keeps_its_last_prototype():
    s = strategy()
    s.merge([A, B])
    s.merge([B])  # class 0 becomes B's [3, 4] (3 samples); class 1 keeps A's [0, 2].
    np.testing.assert_allclose(s.prototypes[2], [[3, 4], [0, 2]])
    np.testing.assert_array_equal(s.counts[2], [3, 3])


def test_the_device_loss_is_cross_entropy_plus_lambda_times_the_feature_to_prototype_mse():
    # Logits [0, 0]: cross-entropy ln 2. Features [1, 2] (label 0) and [3, 4] (label 1);
    # class 0's prototype is [0, 0], class 1 has none (its sample is its own target).
    # Squared errors 1 + 4 + 0 + 0 over 2 x 2 entries: 5 / 4 = 1.25.
    logits, features = torch.zeros(2, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    labels = torch.tensor([0, 1])
    prototypes, has = torch.tensor([[0.0, 0.0], [9.0, 9.0]]), torch.tensor([True, False])
    loss, distance = fedproto.proto_loss(logits, features, labels, prototypes, has, lam=2.0)
    assert float(distance) == pytest.approx(1.25)
    assert float(loss) == pytest.approx(math.log(2) + 2.0 * 1.25)
    loss, distance = fedproto.proto_loss(logits, features, labels, None, None, lam=2.0)
    assert float(loss) == pytest.approx(math.log(2)) and float(distance) == 0.0


def test_nearest_prototype_inference_ignores_classes_without_a_prototype():
    features = np.array([[0.0, 0.0], [10.0, 10.0], [4.0, 4.0]])
    prototypes = np.array([[1.0, 1.0], [9.0, 9.0], [5.0, 5.0]])
    # [4, 4] is nearest to class 2's [5, 5] (distance^2 2), but class 2 has no prototype;
    # of the others, [1, 1] (18) beats [9, 9] (50).
    assert fedproto.nearest_prototype(features, prototypes, np.array([1, 1, 0])).tolist() == [0, 1, 0]
    assert fedproto.nearest_prototype(features, prototypes, np.array([1, 1, 1])).tolist() == [0, 1, 2]


def proto_call(scenario: Scenario, device_id: int, config: dict) -> DeviceCall:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    message = Message(RecordDict({"config": ConfigRecord(config),
                                  TASK: ConfigRecord({"device_id": device_id, "round": 1, "seed": scenario.seed})}),
                      1001, fedproto.MESSAGE_TYPE)
    return DeviceCall.of(scenario, message)


def test_the_device_uploads_its_trained_models_mean_feature_per_class(tiny_scenario):
    scenario = Scenario.model_validate(tiny_scenario)
    ctx = simulation_context(scenario)
    device = ctx.device(0)
    config = {"server-round": 1, "lam": 1.0, "codec": "fp32"}
    reply = fedproto.fedproto_task(proto_call(scenario, 0, config))
    # The trained model (as the device keeps it) gives these features; their per-class mean is the upload.
    model = device_model(ctx, 0, device.model_tier, device.modalities, reply.content[STATE])
    with torch.no_grad():
        features = model.features(to_tensors(device.data, device.modalities)).numpy()
    labels = device.data.labels
    counts = np.bincount(labels, minlength=10)
    expected = np.array([features[labels == c].mean(0) if counts[c] else np.zeros(model.feature_dim)
                         for c in range(10)])
    np.testing.assert_allclose(decode_any(bytes(reply.content["fedproto"]["prototypes"])), expected, atol=1e-5)
    np.testing.assert_array_equal(decode_any(bytes(reply.content["fedproto"]["counts"])), counts)
    # FLOPs: training (samples x epochs), then one forward pass over the shard for the prototypes.
    n, epochs = len(labels), scenario.training.local_epochs
    tier, mods = device.model_tier, device.modalities
    assert reply.content[COST]["flops"] == (ctx.train_flops_per_sample(tier, mods) * n * epochs
                                            + ctx.forward_flops_per_sample(tier, mods) * n)


# -- backend.torch_device (see tests/test_fd.py: "auto" is the cpu on a machine without a GPU) --
def test_the_global_prototypes_come_where_they_are_asked_for():
    config = {"prototypes": get_codec("fp32").encode(np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)),
              "prototype-counts": get_codec("fp32").encode(np.array([4.0, 0.0], np.float32))}
    prototypes, has = fedproto.global_prototypes(config, 2, 3)
    assert prototypes.device == has.device == torch.device("cpu")
    assert prototypes.tolist() == [[1, 2, 3], [0, 0, 0]] and has.tolist() == [True, False]
    meta = fedproto.global_prototypes(config, 2, 3, torch.device("meta"))
    assert [t.device.type for t in meta] == ["meta", "meta"] and meta[0].shape == (2, 3)
    assert fedproto.global_prototypes({}, 2, 3, torch.device("meta")) == (None, None)
    with pytest.raises(ValueError, match="prototypes"):
        fedproto.global_prototypes(config, 2, 4)  # another feature width


def test_the_device_task_and_the_prototype_inference_run_where_the_model_is(tiny_scenario, monkeypatch):
    # Prepare: global prototypes for device 0's feature width, class 3 without one.
    ctx = simulation_context(Scenario.model_validate(tiny_scenario))
    device = ctx.device(0)
    dim = ctx.new_model(device.model_tier).feature_dim
    prototypes = np.random.default_rng(0).normal(size=(10, dim)).astype(np.float32)
    config = {"server-round": 2, "lam": 1.0, "codec": "fp32", "prototypes": get_codec("fp32").encode(prototypes),
              "prototype-counts": get_codec("fp32").encode((np.arange(10) != 3).astype(np.float32))}
    told = placement_spy(fedproto, monkeypatch)
    # Execute: the device's task, and the paper's inference on the trained model.
    replies, features = {}, {}
    for where in ("cpu", "auto"):
        scenario = on_torch_device(tiny_scenario, where)
        replies[where] = fedproto.fedproto_task(proto_call(scenario, 0, config))
        model = device_model(simulation_context(scenario), 0, device.model_tier, device.modalities,
                             replies[where].content[STATE])
        features[where] = fedproto._features(model, device.data, device.modalities)
    # Assert: training, the prototypes and the inference each asked where the model is.
    auto = resolve_torch_device("auto")
    assert told == [torch.device("cpu")] * 3 + [auto] * 3
    assert_same_reply(replies["auto"], replies["cpu"])
    assert features["auto"].shape == features["cpu"].shape == (len(device.data), dim)
    assert auto.type != "cpu" or np.array_equal(features["auto"], features["cpu"])


def test_bad_parameters_fail_at_construction():
    for bad, match in (({"lam": -1.0}, "lam"), ({"codec": "gzip"}, "codec"),
                       ({"fraction_train": 1.5}, "fraction_train"), ({"local_epochs": 0}, "local_epochs")):
        with pytest.raises(ValueError, match=match):
            FedProto(**bad)


def test_state_round_trips_through_a_checkpoint():
    s = strategy()
    s.merge([A, B, D])
    restored = strategy()
    restored.fedkd_restore(decode(encode(s.fedkd_state())))
    for dim in (2, 3):
        assert restored._prototypes_for(dim) == s._prototypes_for(dim)


# The tests' tiny scenario with enough data and rounds for learning to show (as tests/test_learning.py);
# cameras run the tiny tier (16-d features), phones the default small one (32-d).
LEARN = {**copy.deepcopy(TINY), "name": "learn", "rounds": 3, "training": {"local_epochs": 3, "batch_size": 10},
         "strategy_defaults": {"fraction_train": 1.0, "min_available_nodes": 2}}
LEARN["data"].update(partition={"label_alpha": 1.0, "samples_per_device": 100}, test_samples=300)
LEARN["population"]["classes"][1]["model_tier"] = "tiny"


def test_fedproto_learns_in_two_prototype_groups_and_moves_exactly_its_payloads():
    scenario = parse_scenario({**LEARN, "strategies": ["fedproto"]}, "learn.yaml")
    # 10 classes x d floats + the 20-byte header: 1,300 bytes (d = 32) or 660 (d = 16); counts 20 + 40.
    assert [get_codec("fp32").encoded_size(10, d) for d in (32, 16, 1)] == [1300, 660, 60]
    proto_bytes = {"phone": 1300, "camera": 660}
    sink = []
    run_backend(scenario.backend, make_server_app(StrategyJob(scenario, scenario.strategies[0]), sink),
                make_client_app(scenario))
    accuracy = [r.accuracy for r in sink[0].rounds]
    assert accuracy[-1] >= 0.2 and accuracy[-1] >= accuracy[0] + 0.1, accuracy
    assert "accuracy_proto" in sink[0].rounds[-1].metrics
    ctx = simulation_context(scenario)
    tasks = [d for d in sink[0].devices if d.status == "ok"]
    assert len(tasks) == 12 * 3
    for task in tasks:
        size = proto_bytes[task.device_class]
        up = RecordDict({"fedproto": ConfigRecord({"prototypes": bytes(size), "counts": bytes(60)}),
                         "metrics": MetricRecord({"num-examples": len(ctx.device(task.device_id).data),
                                                  "train-loss": 1.0, "proto-loss": 1.0})})
        assert task.bytes_up == payload_bytes(up)
        # Down: the config, and from round 2 the prototypes of the device's own group.
        config = {"server-round": task.round, "lam": 1.0, "codec": "fp32"}
        if task.round > 1:
            config |= {"prototypes": bytes(size), "prototype-counts": bytes(60)}
        assert task.bytes_down == payload_bytes(RecordDict({"config": ConfigRecord(config)}))


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    raw = copy.deepcopy(TINY)
    raw.update(rounds=3, strategy_defaults={"fraction_train": 0.5, "min_available_nodes": 2},
               strategies=[{"name": "fedproto"}])
    scenario = parse_scenario(raw)
    stops, uninterrupted, resumed = resumed_after_stops(scenario, tmp_path)
    assert stops == 1
    assert resumed == uninterrupted
