"""fedgkt: small device models upload features, logits and labels; a server model learns from them
and sends its logits back (He et al. 2020)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedkd.checkpoint import encode
from fedkd.cli import main
from fedkd.codecs import HEADER_BYTES, decode_any, get_codec
from fedkd.contract import DeviceCall, StrategyEnv
from fedkd.device_models import model_key, model_keys
from fedkd.registry import resolve_strategy
from fedkd.scoring import evaluation_panel
from fedkd.context import resolve_torch_device, simulation_context
from fedkd.protocol import COST, STATE, TASK
from fedkd.scenario import Scenario, parse_scenario

from .conftest import TINY
from .test_fd import assert_same_reply, on_torch_device, placement_spy

FedGKT = resolve_strategy("fedgkt").cls
module = __import__(FedGKT.__module__, fromlist=["gkt_loss"])
gkt_loss, gkt_task = module.gkt_loss, module.gkt_task


# -- the losses and the server's step, by hand --------------------------------------
def test_the_loss_is_ce_plus_alpha_t_squared_kl_to_the_teacher():
    # Two samples, two classes, label 0 for both; the model's logits are [0, 0] (p = [1/2, 1/2]).
    logits = torch.zeros(2, 2)
    labels = torch.tensor([0, 0])
    # CE = ln 2 = 0.693147. A teacher [ln 3, 0] at T = 1 gives q = [3/4, 1/4];
    # KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812.
    teacher = torch.tensor([[math.log(3), 0.0]] * 2)
    assert float(gkt_loss(logits, labels, None, 1.0, 1.0)) == pytest.approx(0.693147, abs=1e-6)
    assert float(gkt_loss(logits, labels, teacher, 1.0, 1.0)) == pytest.approx(0.823959, abs=1e-6)
    # At T = 2 a teacher [2 ln 3, 0] gives the same q; the KL is scaled by T^2 = 4: 0.523248;
    # with alpha = 0.5: 0.693147 + 0.261624 = 0.954771.
    assert float(gkt_loss(logits, labels, 2 * teacher, 0.5, 2.0)) == pytest.approx(0.954771, abs=1e-6)


def zero_server(dim: int, classes: int) -> torch.nn.Sequential:
    model = torch.nn.Sequential(torch.nn.Linear(dim, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


@pytest.mark.parametrize("alpha, expected", [(0.0, [0.2, -0.2]), (2.0, [-0.2, 0.2])])
def test_one_server_step_on_one_feature_moves_towards_label_and_device_logits(alpha, expected):
    # Prepare: a linear server model (no hidden layer) with zero weights; one device uploads one
    # sample with feature [1], label 0 and its logits [0, ln 9] (q = [0.1, 0.9] at T = 1).
    strategy = FedGKT(server_layers=0, server_epochs=1, server_batch_size=1, server_learning_rate=0.1,
                      alpha=alpha, temperature=1.0)
    strategy.models[(0, 1)] = zero_server(1, 2)
    group = [(7, np.array([[1.0]]), np.array([[0.0, math.log(9)]]), np.array([0]))]
    # Execute
    flops = strategy.train_server((0, 1), group, server_round=1)
    # Assert: the server's logits z = [0, 0], p = [1/2, 1/2]. d CE / dz = p - onehot(0) = [-0.5, 0.5];
    # d KD / dz = alpha T (p - q) = alpha [0.4, -0.4]. alpha = 0: [-0.5, 0.5]; alpha = 2: [0.3, -0.3].
    # Adam's first step moves each parameter by lr * sign(gradient) = 0.1 against it; W and b
    # see the same gradient (feature 1), so the logits of the feature become 2 * 0.1 * -sign:
    # alpha = 0 -> [0.2, -0.2] (towards the label); alpha = 2 -> [-0.2, 0.2] (the device's logits win).
    np.testing.assert_allclose(strategy.server_logits[7], [expected], atol=1e-6)
    assert strategy.device_slot[7] == (0, 1)
    # FLOPs: forward 2 * 1 * 2 = 4 per sample, training 3 * 4 = 12; one sample, one epoch: 12 + 4.
    assert flops == 16


def test_devices_of_different_feature_widths_get_different_server_models():
    strategy = FedGKT(server_layers=1, server_hidden=8, server_learning_rate=0.01)
    narrow = [(1, np.ones((3, 16)), np.zeros((3, 2)), np.array([0, 1, 0]))]
    wide = [(2, np.ones((4, 32)), np.zeros((4, 2)), np.array([1, 1, 0, 0]))]
    strategy.train_server((0, 16), narrow, 1)
    strategy.train_server((0, 32), wide, 1)
    assert sorted(strategy.models) == [(0, 16), (0, 32)]
    assert strategy.models[(0, 32)][0].in_features == 32
    assert strategy.server_logits[1].shape == (3, 2) and strategy.server_logits[2].shape == (4, 2)


def test_state_round_trips_and_the_restored_server_trains_the_same():
    # Prepare: a server that has trained once.
    a = FedGKT(server_layers=1, server_hidden=8, server_learning_rate=0.01)
    group = [(5, np.arange(12.0).reshape(3, 4) / 10, np.zeros((3, 2)), np.array([0, 1, 1]))]
    a.train_server((1, 4), group, 1)
    # Execute: through a checkpoint's encoder, into a fresh strategy; both train once more.
    b = FedGKT(server_layers=1, server_hidden=8, server_learning_rate=0.01)
    state = a.fedkd_state()
    encode(state)  # only what a checkpoint may hold
    b.fedkd_restore(state)
    a.train_server((1, 4), group, 2)
    b.train_server((1, 4), group, 2)
    # Assert
    assert b.device_slot == a.device_slot == {5: (1, 4)}
    np.testing.assert_array_equal(a.server_logits[5], b.server_logits[5])
    assert b.server_flops == a.server_flops


def test_bad_parameters_fail_at_construction():
    for bad in ({"temperature": 0}, {"alpha": -1}, {"server_epochs": 0}, {"codec": "gzip"},
                {"fraction_train": 0}, {"server_layers": -1}):
        with pytest.raises(ValueError):
            FedGKT(**bad)


# -- the device's task ----------------------------------------------------------------
@pytest.fixture
def tiny() -> Scenario:
    return Scenario.model_validate(copy.deepcopy(TINY))


def gkt_message(scenario: Scenario, device_id: int, server_logits: np.ndarray | None = None) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    config = {"server-round": 2, "temperature": 3.0, "alpha": 1.0, "codec": "fp32"}
    if server_logits is not None:
        config["server-logits"] = get_codec("fp32").encode(server_logits)
    return Message(RecordDict({"config": ConfigRecord(config),
                               TASK: ConfigRecord({"device_id": device_id, "round": 2, "seed": scenario.seed})}),
                   1001, "train.gkt")


def test_a_device_uploads_its_features_logits_and_labels_and_reports_its_flops(tiny):
    ctx = simulation_context(tiny)
    device = ctx.device(1)
    n, classes, dim = len(device.data), ctx.dataset.num_classes, 32  # tier small: feature width 32
    # Execute: with server logits for its n samples.
    reply = gkt_task(DeviceCall.of(tiny, gkt_message(tiny, 1, np.zeros((n, classes), np.float32))))
    upload = reply.content["upload"]
    # Assert: n x 32 features, n x 10 logits (fp32, 20-byte header each), n one-byte labels.
    assert decode_any(bytes(upload["features"])).shape == (n, dim)
    assert decode_any(bytes(upload["logits"])).shape == (n, classes)
    assert len(upload["features"]) == HEADER_BYTES + 4 * n * dim
    assert len(upload["logits"]) == HEADER_BYTES + 4 * n * classes
    assert np.array_equal(np.frombuffer(upload["labels"], np.uint8), device.data.labels)
    epochs = tiny.training.local_epochs
    assert reply.content[COST]["flops"] == (ctx.train_flops_per_sample(device.model_tier, device.modalities) * n * epochs
                                            + ctx.forward_flops_per_sample(device.model_tier, device.modalities) * n)
    # Its model travels in its state under the key fedkd's scoring reads.
    assert model_keys(reply.content[STATE]) == [model_key(device.model_tier, device.modalities)]


def test_server_logits_of_the_wrong_length_are_refused(tiny):
    with pytest.raises(ValueError, match="server logits"):
        gkt_task(DeviceCall.of(tiny, gkt_message(tiny, 1, np.zeros((3, 10), np.float32))))


# -- backend.torch_device (see tests/test_fd.py: "auto" is the cpu on a machine without a GPU) --
def test_the_server_logits_come_where_they_are_asked_for():
    config = {"server-logits": get_codec("fp32").encode(np.arange(6, dtype=np.float32).reshape(3, 2))}
    teacher = module.server_logits_of(config, 3)
    assert teacher.device == torch.device("cpu") and teacher.tolist() == [[0, 1], [2, 3], [4, 5]]
    meta = module.server_logits_of(config, 3, torch.device("meta"))
    assert meta.device.type == "meta" and (meta.shape, meta.dtype) == ((3, 2), torch.float32)
    assert module.server_logits_of({}, 3, torch.device("meta")) is None
    with pytest.raises(ValueError, match="server logits"):
        module.server_logits_of(config, 4)


def test_the_device_task_runs_where_its_model_is(monkeypatch):
    n = len(simulation_context(Scenario.model_validate(copy.deepcopy(TINY))).device(1).data)
    server_logits = np.random.default_rng(0).normal(size=(n, 10)).astype(np.float32)
    told = placement_spy(module, monkeypatch)
    replies = {}
    for where in ("cpu", "auto"):
        scenario = on_torch_device(TINY, where)
        replies[where] = gkt_task(DeviceCall.of(scenario, gkt_message(scenario, 1, server_logits)))
    assert told == [torch.device("cpu"), resolve_torch_device("auto")]
    assert_same_reply(replies["auto"], replies["cpu"])


def test_the_server_model_and_its_score_take_inputs_where_each_model_is(monkeypatch):
    # Prepare: a server that has trained on two devices' uploads of 32-wide features (tier small).
    ctx = simulation_context(on_torch_device(TINY, "auto"))
    strategy = FedGKT(server_layers=1, server_hidden=8, server_learning_rate=0.01)
    strategy.fedkd_setup(StrategyEnv(ctx=ctx))
    rng = np.random.default_rng(1)
    group = [(d, rng.normal(size=(5, 32)), rng.normal(size=(5, 10)), rng.integers(0, 10, 5)) for d in (3, 4)]
    told = placement_spy(module, monkeypatch)
    # Execute: its training, then the paper's score (each panel device's extractor, then the server model).
    strategy.train_server((0, 32), group, 1)
    panel = evaluation_panel(ctx, ctx.scenario.evaluation.panel_devices)
    strategy.device_slot.update({device.device_id: (0, 32) for device in panel})
    metrics = strategy.fedkd_round_metrics(ctx, {})
    # Assert: the server model is built on the cpu; the extractors where the context places models.
    assert told == [torch.device("cpu")] + [resolve_torch_device("auto"), torch.device("cpu")] * len(panel)
    assert {d: logits.shape for d, logits in strategy.server_logits.items()} == {3: (5, 10), 4: (5, 10)}
    assert 0.0 <= metrics["accuracy_gkt_server"] <= 1.0


# -- the whole simulated world ---------------------------------------------------------
def gkt_scenario(rounds: int, fraction: float, epochs: int = 3, samples: int = 60) -> dict:
    raw = copy.deepcopy(TINY)
    raw.update(rounds=rounds, training={"local_epochs": epochs, "batch_size": 10})
    raw["data"]["partition"]["samples_per_device"] = samples
    raw["strategy_defaults"] = {"fraction_train": fraction, "min_available_nodes": 2}
    raw["strategies"] = [{"name": "fedgkt", "params": {"server_epochs": 2}}]
    return raw


def test_fedgkt_learns_and_moves_exactly_features_logits_and_labels(write_scenario, tmp_path):
    # Prepare: every device every round, so from round 2 on each gets its server logits.
    raw = gkt_scenario(rounds=3, fraction=1.0)
    out = tmp_path / "gkt"
    # Execute
    assert main(["simulate", str(write_scenario(raw)), "--out", str(out)]) == 0
    # Assert: it learns (chance is 0.1) ...
    rounds = pd.read_csv(out / "rounds.csv")
    accuracy = rounds["accuracy"].tolist()
    assert accuracy[-1] >= 0.2 and accuracy[-1] >= accuracy[0] + 0.1, accuracy
    assert rounds["accuracy_gkt_server"].iloc[-1] > 0.1
    # ... and each device sent its features (32 wide), logits (10) and labels, and received
    # from round 2 on the server's logits for its samples: payloads plus the records' framing.
    ctx = simulation_context(parse_scenario(raw))
    devices = pd.read_csv(out / "devices.csv")
    train = devices[(devices["phase"] == "train") & (devices["status"] == "ok")]
    assert len(train) == 3 * 12
    for row in train.itertuples():
        n = len(ctx.device(row.device_id).data)
        up = (HEADER_BYTES + 4 * n * 32) + (HEADER_BYTES + 4 * n * 10) + n
        assert up <= row.bytes_up <= up + 400, (row.device_id, row.bytes_up, up)
        down = HEADER_BYTES + 4 * n * 10 if row.round > 1 else 0
        assert down <= row.bytes_down <= down + 400, (row.device_id, row.bytes_down, down)


def test_a_run_stopped_after_each_round_ends_as_the_uninterrupted_one(tmp_path):

    from .test_resume import restless_world, resumed_after_stops

    raw = restless_world(gkt_scenario(rounds=3, fraction=0.5, epochs=1, samples=20))  # two fogs, a server model each
    scenario = parse_scenario(raw)
    stops, uninterrupted, resumed = resumed_after_stops(scenario, tmp_path)
    assert stops == 1
    assert resumed == uninterrupted
