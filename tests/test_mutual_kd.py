"""mutual_kd (FedKD, Wu et al. 2022): private mentors, a shared mentee, adaptive mutual distillation,
SVD-compressed mentee updates averaged per parameter over the devices that hold it."""
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
from fedkd.codecs import HEADER_BYTES
from fedkd.contract import DeviceCall
from fedkd.device_models import model_key, model_keys
from fedkd.registry import resolve_strategy
from fedkd.context import resolve_torch_device, simulation_context
from fedkd.protocol import COST, STATE, TASK
from fedkd.scenario import Scenario, parse_scenario

from .conftest import TINY
from .test_fd import assert_same_reply, on_torch_device, placement_spy

MutualKD = resolve_strategy("mutual_kd").cls
kd = __import__(MutualKD.__module__, fromlist=["compress"])


# -- the device's loss, by hand ---------------------------------------------------------
def test_adaptive_mutual_distillation_on_two_samples():
    # Prepare: mentor logits [ln 3, 0] (p_t = [3/4, 1/4]) and mentee logits [0, 0] (p_s = [1/2, 1/2])
    # for two samples labelled 0 and 1.
    mentor = torch.tensor([[math.log(3), 0.0]] * 2, requires_grad=True)
    mentee = torch.zeros(2, 2, requires_grad=True)
    labels = torch.tensor([0, 1])
    # Execute
    loss_t, loss_s, ce_t, ce_s = kd.mutual_losses(mentor, mentee, labels)
    # Assert: CE_t = (-ln 3/4 - ln 1/4) / 2 = (0.287682 + 1.386294) / 2 = 0.836988; CE_s = ln 2 = 0.693147;
    # the scale 1 / (0.836988 + 0.693147) = 1 / 1.530135 = 0.653537.
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812 -> mentee loss 0.693147 + 0.130812 * 0.653537 = 0.778637.
    # KL(p_s || p_t) = 1/2 ln(2/3) + 1/2 ln 2 = 0.143841 -> mentor loss 0.836988 + 0.143841 * 0.653537 = 0.930993.
    assert ce_t.item() == pytest.approx(0.836988, abs=1e-6)
    assert ce_s.item() == pytest.approx(0.693147, abs=1e-6)
    assert loss_s.item() == pytest.approx(0.778637, abs=1e-6)
    assert loss_t.item() == pytest.approx(0.930993, abs=1e-6)
    # The gradient of the mentee's loss: the scale and the mentor's prediction are constants, so
    # d/dz_s = [(p_s - y) + 0.653537 (p_s - p_t)] / 2; row 0: ([-1/2, 1/2] + 0.653537 [-1/4, 1/4]) / 2
    # = [-0.331692, 0.331692]; row 1: ([1/2, -1/2] + 0.653537 [-1/4, 1/4]) / 2 = [0.168308, -0.168308].
    loss_s.backward()
    np.testing.assert_allclose(mentee.grad.numpy(), [[-0.331692, 0.331692], [0.168308, -0.168308]], atol=1e-6)
    assert mentor.grad is None  # the mentee's loss teaches the mentee only


# -- the compression, by hand ----------------------------------------------------------
def test_rank_for_energy_and_the_threshold_schedule():
    # sigma = [3, 2, 1]: energies 9, 4, 1 of 14; cumulative 0.643, 0.929, 1.
    assert kd.rank_for_energy(np.array([3.0, 2.0, 1.0]), 0.6) == 1
    assert kd.rank_for_energy(np.array([3.0, 2.0, 1.0]), 0.9) == 2
    assert kd.rank_for_energy(np.array([3.0, 2.0, 1.0]), 0.95) == 3
    assert kd.rank_for_energy(np.zeros(3), 0.95) == 0
    # T_t = 0.95 + 0.03 t / R, R = 5: round 1 0.956, round 5 0.98.
    assert kd.threshold_at(1, 5, 0.95, 0.98) == pytest.approx(0.956)
    assert kd.threshold_at(5, 5, 0.95, 0.98) == pytest.approx(0.98)


def two_directions() -> np.ndarray:
    """An 8 x 6 matrix with singular values 3 and 1: 3 e1 e1^T + 1 e2 e2^T (energies 9 and 1 of 10)."""
    m = np.zeros((8, 6))
    m[0, 0], m[1, 1] = 3.0, 1.0
    return m


@pytest.mark.parametrize("threshold, rank, kept", [(0.9, 1, [3.0, 0.0]), (0.95, 2, [3.0, 1.0])])
def test_compress_keeps_the_singular_values_that_reach_the_energy_and_sends_their_factors(threshold, rank, kept):
    # Execute
    entries, flops = kd.compress({"w": two_directions(), "b": np.array([0.5, -0.5]), "z": np.zeros((3, 3))},
                                 threshold, "fp32")
    rebuilt, rebuild_flops = kd.decompress(entries, {"w": (8, 6), "b": (2,), "z": (3, 3)})
    # Assert: T = 0.9 keeps sigma_1 (9/10 reaches 0.9); T = 0.95 needs both. The factors
    # U (8 x k), sigma (k), V (k x 6) cost 20-byte headers plus 4 bytes a float:
    # k = 1: 52 + 24 + 44 = 120 bytes; k = 2: 84 + 28 + 68 = 180; the whole matrix 20 + 192 = 212.
    assert sorted(entries) == ["b|dense", "w|s", "w|u", "w|v"]  # the zero matrix is not sent
    assert sum(len(entries[f"w|{p}"]) for p in "usv") == {1: 120, 2: 180}[rank]
    assert len(entries["b|dense"]) == HEADER_BYTES + 8
    expected = np.zeros((8, 6))
    expected[0, 0], expected[1, 1] = kept
    np.testing.assert_allclose(rebuilt["w"], expected, atol=1e-6)
    np.testing.assert_allclose(rebuilt["b"], [0.5, -0.5])
    assert "z" not in rebuilt
    # R-SVD of 8 x 6: 6 * 8 * 36 + 20 * 216 = 1728 + 4320 = 6048 FLOPs (the zero matrix is skipped);
    # rebuilding: 2 * 8 * 6 * k.
    assert flops == 6048 and rebuild_flops == 96 * rank


def test_a_matrix_whose_factors_are_no_smaller_goes_whole():
    # A 2 x 2 of rank 2: factors 2 x 2 + 2 + 2 x 2 (3 headers) against one 2 x 2.
    entries, _ = kd.compress({"w": np.array([[1.0, 2.0], [3.0, 4.0]])}, 0.98, "fp32")
    assert sorted(entries) == ["w|dense"]
    rebuilt, _ = kd.decompress(entries, {"w": (2, 2)})
    np.testing.assert_allclose(rebuilt["w"], [[1, 2], [3, 4]])


# -- the server's aggregation, by hand ------------------------------------------------
def test_updates_are_averaged_per_parameter_over_the_devices_that_hold_it():
    shapes = {"head.w": (2,), "encoders.audio.w": (1,), "encoders.image.w": (1,), "encoders.depth.w": (1,)}
    updates = [{"head.w": np.array([1.0, 1.0]), "encoders.audio.w": np.array([2.0])},  # audio, 1 example
               {"head.w": np.array([5.0, 5.0]), "encoders.image.w": np.array([4.0])},  # image, 3 examples
               {"head.w": np.array([0.0, 2.0])}]  # audio, 2 examples, its audio encoder unchanged
    mean = kd.per_parameter_mean(updates, [1.0, 3.0, 2.0], [("audio",), ("image",), ("audio",)], shapes)
    # head: (1 * [1, 1] + 3 * [5, 5] + 2 * [0, 2]) / 6 = [16/6, 20/6];
    # audio over the two audio devices: (1 * 2 + 2 * 0) / 3 = 2/3; image: 4 (one device); depth: nobody, 0.
    np.testing.assert_allclose(mean["head.w"], [16 / 6, 20 / 6])
    np.testing.assert_allclose(mean["encoders.audio.w"], [2 / 3])
    np.testing.assert_allclose(mean["encoders.image.w"], [4.0])
    np.testing.assert_allclose(mean["encoders.depth.w"], [0.0])


def test_bad_parameters_fail_at_construction():
    for bad in ({"t_start": 0}, {"t_end": 1.5}, {"mentee_tier": "huge"}, {"factor_codec": "gzip"},
                {"fraction_train": 2}):
        with pytest.raises(ValueError):
            MutualKD(**bad)


# -- the device's task -----------------------------------------------------------------
@pytest.fixture
def tiny() -> Scenario:
    return Scenario.model_validate(copy.deepcopy(TINY))


def mutual_message(scenario: Scenario, device_id: int, mentee: dict) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return Message(RecordDict({
        "mentee": ConfigRecord(mentee),
        "config": ConfigRecord({"server-round": 1, "mentee-tier": "tiny", "energy-threshold": 0.95,
                                "factor-codec": "fp32"}),
        TASK: ConfigRecord({"device_id": device_id, "round": 1, "seed": scenario.seed})}), 1001, "train.mutual")


def test_a_device_trains_both_keeps_its_mentor_and_sends_only_its_mentees_compressed_update(tiny):
    ctx = simulation_context(tiny)
    device = ctx.device(1)
    n, epochs = len(device.data), tiny.training.local_epochs
    # Execute: round 1, the global mentee is still its seeded start (nothing sent).
    reply = kd.mutual_task(DeviceCall.of(tiny, mutual_message(tiny, 1, {})))
    # Assert: the update covers the mentee's parameters the device has: its sensors' encoders and the head.
    start = kd.initial_mentee(ctx, "tiny")
    mine = {k: v.shape for k, v in start.items() if kd.holds(k, device.modalities)}
    update, rebuild = kd.decompress(reply.content["update"], mine)
    assert set(update) == set(mine) and rebuild > 0
    assert all(k.startswith(("head.",) + tuple(f"encoders.{m}." for m in device.modalities)) for k in update)
    # Only the mentor stays on the device, under the key fedkd's scoring reads.
    assert model_keys(reply.content[STATE]) == [model_key(device.model_tier, device.modalities)]
    # FLOPs: both models' training and the SVD of every matrix of the update (sent factorised or
    # whole); nothing came down to rebuild in round 1.
    shapes = [v.shape for k, v in start.items() if k in mine and v.ndim >= 2]
    svd = sum(kd.svd_flops(s[0], int(np.prod(s[1:]))) for s in shapes)
    train = (ctx.train_flops_per_sample(device.model_tier, device.modalities)
             + ctx.train_flops_per_sample("tiny", device.modalities)) * n * epochs
    assert reply.content[COST]["flops"] == train + svd


def test_the_device_task_runs_where_its_models_are(monkeypatch):
    # backend.torch_device (see tests/test_fd.py: "auto" is the cpu on a machine without a GPU).
    # Prepare: a global mentee that has moved since its start, so the device rebuilds it.
    ctx = simulation_context(on_torch_device(TINY, "cpu"))
    sensors = ctx.device(1).modalities
    start = kd.initial_mentee(ctx, "tiny")
    rng = np.random.default_rng(0)
    entries, _ = kd.compress({k: 0.01 * rng.normal(size=v.shape) for k, v in start.items()}, 0.95, "fp32")
    mentee = {k: v for k, v in entries.items() if kd.holds(k.rpartition(kd.FACTOR_SEP)[0], sensors)}
    told = placement_spy(kd, monkeypatch)
    # Execute
    replies, starts = {}, {}
    for where in ("cpu", "auto"):
        scenario = on_torch_device(TINY, where)
        replies[where] = kd.mutual_task(DeviceCall.of(scenario, mutual_message(scenario, 1, mentee)))
        starts[where] = kd.initial_mentee(simulation_context(scenario), "tiny")
    # Assert: the task asked where the mentor is (the mentee joins it), and "auto" gave the "cpu" reply;
    # the seeded start G_0 comes back through the cpu, the same wherever the models run.
    assert told == [torch.device("cpu"), resolve_torch_device("auto")]
    assert_same_reply(replies["auto"], replies["cpu"])
    assert starts["auto"].keys() == start.keys()
    assert all(np.array_equal(starts["auto"][k], start[k]) for k in start)


# -- the whole simulated world -----------------------------------------------------------
def mutual_scenario(rounds: int, fraction: float, epochs: int = 3, samples: int = 60) -> dict:
    raw = copy.deepcopy(TINY)
    raw.update(rounds=rounds, training={"local_epochs": epochs, "batch_size": 10})
    raw["data"]["partition"]["samples_per_device"] = samples
    raw["strategy_defaults"] = {"fraction_train": fraction, "min_available_nodes": 2}
    raw["strategies"] = ["mutual_kd"]
    return raw


def test_mutual_kd_learns_and_sends_less_than_the_whole_mentee(write_scenario, tmp_path):
    raw = mutual_scenario(rounds=3, fraction=1.0)
    out = tmp_path / "mkd"
    assert main(["simulate", str(write_scenario(raw)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    accuracy = rounds["accuracy"].tolist()
    assert accuracy[-1] >= 0.2 and accuracy[-1] >= accuracy[0] + 0.1, accuracy
    assert rounds["accuracy_mentee"].iloc[-1] > rounds["accuracy_mentee"].iloc[0]
    # Traffic: in round 1 the global mentee has not moved, so nothing but the config comes down;
    # going up, the SVD factors weigh less than the device's whole mentee update in fp32.
    ctx = simulation_context(parse_scenario(raw))
    start = kd.initial_mentee(ctx, "tiny")
    devices = pd.read_csv(out / "devices.csv")
    train = devices[(devices["phase"] == "train") & (devices["status"] == "ok")]
    assert len(train) == 3 * 12
    for row in train.itertuples():
        sensors = ctx.device(row.device_id).modalities
        whole = sum(HEADER_BYTES + 4 * v.size for k, v in start.items() if kd.holds(k, sensors))
        assert 0.1 * whole < row.bytes_up < whole, (row.device_id, row.bytes_up, whole)
        if row.round == 1:
            assert row.bytes_down < 400
        else:
            assert 0.1 * whole < row.bytes_down < whole


def test_a_run_stopped_after_each_round_ends_as_the_uninterrupted_one(tmp_path):

    from .test_resume import restless_world, resumed_after_stops

    scenario = parse_scenario(restless_world(mutual_scenario(rounds=3, fraction=0.5, epochs=1, samples=20)))
    stops, uninterrupted, resumed = resumed_after_stops(scenario, tmp_path)
    assert stops == 1
    assert resumed == uninterrupted


def test_state_round_trips_through_a_checkpoint(tiny):
    from fedkd.contract import StrategyEnv

    a = MutualKD()
    a.fedkd_setup(StrategyEnv(ctx=simulation_context(tiny)))
    a.mentee = {k: v + 0.5 for k, v in a.mentee.items()}
    state = a.fedkd_state()
    encode(state)
    b = MutualKD()
    b.fedkd_setup(StrategyEnv(ctx=simulation_context(tiny)))
    b.fedkd_restore(state)
    assert set(b.mentee) == set(a.mentee)
    assert all(np.array_equal(a.mentee[k], b.mentee[k]) for k in a.mentee)
