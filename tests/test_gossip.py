"""Serverless gossip distillation: device-to-device links in the world, the orchestrator
on a 3-device ring, and the device's own step, worked out by hand."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedkd.cli import main
from fedkd.codecs import decode_any, get_codec
from fedkd.context import simulation_context
from fedkd.strategies.gossip_kd.device import (FROM, GOSSIP, REPLY, Teacher, public_batch, strip_heads,
                                         train_with_neighbours)
from fedkd.runtime.inprocess import InProcessGrid
from fedkd.protocol import COST, STATE, cost_record, payload_bytes, task_of, with_task
from fedkd.scenario import PopulationSpec, WorldSpec, parse_scenario
from fedkd.sim.grid import SimulatedGrid
from fedkd.sim.population import Population
from fedkd.sim.recorder import RoundRecorder
from fedkd.sim.world import DeviceWorld, TaskCost
from fedkd.training import predict_logits
from fedkd.strategies.gossip_kd import GossipKD, disagreement
from fedkd.contract import DeviceCall, StrategyEnv


def gossip_task_of(scenario, message):
    from fedkd.strategies.gossip_kd.device import gossip_task as device_task

    return device_task(DeviceCall(simulation_context(scenario), message))

from .conftest import TINY

# -- the device-to-device radio in the world ----------------------------------------


def radio_world(devices: int = 1, **device) -> DeviceWorld:
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "latency_s": 0.5, "jitter_sigma": 0.0, "energy_per_flop_j": 0.0, "energy_per_byte_up_j": 0.0,
           "energy_per_byte_down_j": 0.0, "availability": {"mean_online_s": 1e12, "mean_offline_s": 1e-3}} | device
    world = DeviceWorld(Population(PopulationSpec(devices=devices, classes=[cls]), 0), WorldSpec(), 0)
    world.online[:] = True
    return world


def test_a_d2d_task_runs_on_the_radio_and_never_touches_the_server_link():
    # Prepare: a 1 Mbit/s radio, 0.1 s a message, 1e-6 J a byte; the server link's 0.5 s latency must not count.
    world = radio_world(d2d_bps=1e6, d2d_latency_s=0.1, energy_per_byte_d2d_j=1e-6)
    cost = TaskCost(0, bytes_down=0, flops=1e9, bytes_up=0, d2d_bytes_in=125_000, d2d_messages_in=2,
                    d2d_bytes_out=250_000, d2d_messages_out=2)
    # Execute
    [outcome] = world.run_phase([cost], {})
    # Assert: receive 2 * 0.1 + 8 * 125e3 / 1e6 = 1.2 s; compute 1 s; send 2 * 0.1 + 8 * 250e3 / 1e6 = 2.2 s.
    assert outcome.end_s == pytest.approx(4.4)
    # 375e3 bytes on the radio at 1e-6 J each; nothing on the server link.
    assert outcome.energy_j == pytest.approx(0.375) and outcome.d2d_energy_j == pytest.approx(0.375)
    assert (outcome.bytes_down, outcome.bytes_up, outcome.d2d_bytes_in, outcome.d2d_bytes_out) == (0, 0, 125_000,
                                                                                                  250_000)


def test_without_a_radio_of_its_own_a_device_receives_on_its_downlink_and_sends_on_its_uplink():
    world = radio_world(downlink_bps=2e6, latency_s=0.1, energy_per_byte_down_j=1e-6, energy_per_byte_up_j=2e-6)
    [outcome] = world.run_phase([TaskCost(0, 0, 0.0, 0, 250_000, 1, 125_000, 1)], {})
    # Receive 0.1 + 8 * 250e3 / 2e6 = 1.1 s; send 0.1 + 8 * 125e3 / 1e6 = 1.1 s; 250e3 * 1e-6 + 125e3 * 2e-6 = 0.5 J.
    assert outcome.end_s == pytest.approx(2.2)
    assert outcome.energy_j == pytest.approx(0.5)


def test_the_deadline_cuts_a_d2d_send_and_counts_what_went_out():
    world = radio_world(d2d_bps=1e6, d2d_latency_s=0.1)
    world.spec = WorldSpec(round_deadline_s=3.2)
    [outcome] = world.run_phase([TaskCost(0, 0, 1e9, 0, 125_000, 2, 250_000, 2)], {})
    # The send starts at 1.2 + 1 = 2.2 s and runs 1 s of its 2.2 s: 250e3 / 2.2 = 113,636 bytes.
    assert (outcome.status, outcome.reason, outcome.end_s) == ("failed", "deadline", pytest.approx(3.2))
    assert outcome.d2d_bytes_out == 113_636


# -- the orchestrator on a 3-device ring ----------------------------------------------

RECEIVED: dict[tuple[int, int], dict[int, tuple[int, float]]] = {}


def ring_client(fail: tuple[int, int] | None = None) -> ClientApp:
    """Device d takes (d + 1) s of compute and predicts logits [10 * round + d, 0] for every sample."""
    app = ClientApp()

    @app.train("gossip")
    def train(message: Message, context) -> Message:
        task = task_of(message)
        device, server_round = int(task["device_id"]), int(task["round"])
        if (server_round, device) == fail:
            raise RuntimeError("radio jammed")
        RECEIVED[(server_round, device)] = {
            int(k[len(FROM):]): (int(r["round"]), float(decode_any(bytes(r["payload"]))[0, 0]))
            for k, r in message.content.config_records.items() if k.startswith(FROM)}
        rows = int(message.content[GOSSIP]["public-batch"])
        logits = np.tile(np.array([10.0 * server_round + device, 0.0], dtype=np.float32), (rows, 1))
        return Message(RecordDict({
            REPLY: ConfigRecord({"payload": get_codec("fp32").encode(logits), "round": server_round}),
            COST: cost_record((device + 1) * 1e9),
        }), reply_to=message)

    return app


def run_ring(rounds: int, fail: tuple[int, int] | None = None, **strategy_params):
    RECEIVED.clear()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    world = radio_world(devices=3, d2d_bps=1e6, d2d_latency_s=0.1, energy_per_byte_d2d_j=1e-6)
    recorder = RoundRecorder("gossip_kd", "gossip_kd", world)
    grid = SimulatedGrid(InProcessGrid(ring_client(fail)), world, recorder, seed=0, timeout_s=60)
    strategy = GossipKD(topology="ring", public_batch=4, codec="fp32", **strategy_params)
    strategy.fedkd_setup(StrategyEnv(SimpleNamespace(population=SimpleNamespace(size=3), scenario=SimpleNamespace(seed=0))))
    strategy.start(grid, ArrayRecord(), num_rounds=rounds,
                   evaluate_fn=lambda rnd, arrays: recorder.close_round(rnd, 0.0, {}) and None)
    return recorder.run


# Bytes of one device's message to one neighbour: four rows of two fp32 logits and the round.
ONE = payload_bytes(RecordDict({REPLY: ConfigRecord({"payload": get_codec("fp32").encode(np.zeros((4, 2),
                                                                                                   np.float32)),
                                                      "round": 1})}))


def test_each_device_receives_exactly_its_two_neighbours_previous_predictions():
    run_ring(rounds=2)
    # Round 1: nobody has heard anything yet.
    assert RECEIVED[(1, 0)] == RECEIVED[(1, 1)] == RECEIVED[(1, 2)] == {}
    # Round 2: each gets the other two devices' round-1 logits, 10 * 1 + sender.
    assert RECEIVED[(2, 0)] == {1: (1, 11.0), 2: (1, 12.0)}
    assert RECEIVED[(2, 1)] == {0: (1, 10.0), 2: (1, 12.0)}
    assert RECEIVED[(2, 2)] == {0: (1, 10.0), 1: (1, 11.0)}


def test_d2d_bytes_count_each_copy_and_the_server_link_carries_nothing():
    run = run_ring(rounds=2)
    for record in run.rounds[1:]:
        # Three devices each send their message to 2 neighbours: 3 * 2 copies.
        assert record.metrics["d2d_bytes"] == 3 * 2 * ONE
        assert record.bytes_up == record.bytes_down == 0
    # Energy at 1e-6 J/byte: round 1 only sends (6 copies); round 2 also receives them.
    assert run.rounds[1].metrics["d2d_energy_j"] == pytest.approx(6 * ONE * 1e-6)
    assert run.rounds[2].metrics["d2d_energy_j"] == pytest.approx(12 * ONE * 1e-6)


def test_the_round_lasts_as_long_as_the_slowest_exchange():
    run = run_ring(rounds=2)
    send = 2 * 0.1 + 8 * 2 * ONE / 1e6  # two messages of ONE bytes at 1 Mbit/s, 0.1 s each
    receive = send
    # Round 1: device 2 computes 3 s then sends. Round 2: it also receives first.
    assert run.rounds[1].sim_time_s == pytest.approx(3 + send)
    assert run.rounds[2].sim_time_s == pytest.approx(3 + send + receive + 3 + send)
    device0 = [d for d in run.devices if d.device_id == 0 and d.round == 2][0]
    assert device0.end_s - device0.start_s == pytest.approx(receive + 1 + send)


def test_a_failed_device_sends_nothing_and_keeps_what_was_sent_to_it():
    # Device 1 fails in round 2: its neighbours hear nothing new from it, and it keeps its mail.
    run = run_ring(rounds=3, fail=(2, 1))
    assert RECEIVED[(3, 0)] == {2: (2, 22.0)}
    assert RECEIVED[(3, 1)] == {0: (2, 20.0), 2: (2, 22.0)}
    assert RECEIVED[(3, 2)] == {0: (2, 20.0)}
    # Round 2 moved the messages of devices 0 and 2 only.
    assert run.rounds[2].metrics["d2d_bytes"] == 2 * 2 * ONE


def test_with_fraction_train_a_share_wakes_and_a_sleeper_gets_its_mail_when_it_wakes():
    # Three devices on a ring, a third of them awake a round: int(3 * 0.34) = 1 device.
    run = run_ring(rounds=2, fraction_train=0.34, min_available_nodes=1)
    [(_, first)] = [key for key in RECEIVED if key[0] == 1]
    [(_, second)] = [key for key in RECEIVED if key[0] == 2]
    # Round 1's device pushed 10 * 1 + itself to both its neighbours, both asleep then; the
    # round-2 device gets it if it was one of them (on a ring of three: any other device).
    assert second != first  # seed 0 wakes device 2, then device 1: the sleeper's mail is delivered
    assert RECEIVED[(1, first)] == {}
    assert RECEIVED[(2, second)] == ({} if second == first else {first: (1, 10.0 + first)})
    # One device a round sends to its 2 neighbours.
    assert [r.metrics["d2d_bytes"] for r in run.rounds[1:]] == [2 * ONE, 2 * ONE]
    # The draw is keyed by (seed, round): the same devices wake in a second run.
    woke = sorted(RECEIVED)
    run_ring(rounds=2, fraction_train=0.34, min_available_nodes=1)
    assert sorted(RECEIVED) == woke


def test_fraction_train_wakes_at_least_min_available_nodes():
    # int(3 * 0.05) = 0, raised to min_available_nodes = 2.
    run_ring(rounds=1, fraction_train=0.05, min_available_nodes=2)
    assert len(RECEIVED) == 2


def test_disagreement_is_the_mean_over_edges_of_the_share_of_differing_predictions():
    predicted = {0: np.array([0, 0, 1, 1]), 1: np.array([0, 1, 1, 1]), 2: np.array([1, 1, 1, 1])}
    # Edges 0-1: 1 of 4 differ; 0-2: 2 of 4; 1-2: 1 of 4. Mean (1/4 + 2/4 + 1/4) / 3 = 1/3.
    assert disagreement(predicted, [(0, 1), (0, 2), (1, 2)]) == pytest.approx(1 / 3)


def test_bad_parameters_fail_at_construction():
    with pytest.raises(ValueError, match="topology"):
        GossipKD(topology="star")
    with pytest.raises(ValueError, match="codec"):
        GossipKD(codec="gzip")
    with pytest.raises(ValueError, match="fraction_train"):
        GossipKD(fraction_train=0)


# -- the device's own step ---------------------------------------------------------------


def gossip_task(device: int, server_round: int, heard: dict[int, np.ndarray], aux_heads: bool = False,
                state=None, distill_weight: float = 0.25) -> Message:
    protocol = ConfigRecord({"public-batch": 8, "codec": "fp32", "temperature": 2.0,
                             "distill-weight": distill_weight, "aux-heads": aux_heads, "local-epochs": 2})
    content = {GOSSIP: protocol}
    for sender, logits in heard.items():
        content[f"{FROM}{sender}"] = ConfigRecord({"payload": get_codec("fp32").encode(logits), "round": 1})
    content = with_task(RecordDict(content), device, server_round, TINY["seed"])
    if state is not None:
        content[STATE] = state
    return Message(content, 1001, "train.gossip")


@pytest.fixture(scope="module")
def tiny():
    return parse_scenario(TINY)


def test_the_device_distills_each_neighbours_samples_once_per_epoch(tiny):
    # Prepare: device 0 hears from devices 1 and 2 (8 public samples each, 10 classes).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ctx = simulation_context(tiny)
    device = ctx.device(0)
    heard = {1: np.zeros((8, 10), np.float32), 2: np.ones((8, 10), np.float32)}
    # Execute
    alone = gossip_task_of(tiny, gossip_task(0, 2, {}))
    taught = gossip_task_of(tiny, gossip_task(0, 2, heard))
    # Assert: 2 epochs over 2 x 8 public samples more, at the training cost of one sample each.
    per_sample = ctx.train_flops_per_sample(device.model_tier, device.modalities)
    assert float(taught.content[COST]["flops"]) - float(alone.content[COST]["flops"]) == 2 * 16 * per_sample
    # It replies with its predictions on this round's 8 public samples, for its neighbours.
    reply = taught.content[REPLY]
    assert int(reply["round"]) == 2 and decode_any(bytes(reply["payload"])).shape == (8, 10)
    expected = predict_logits(_model_of(ctx, 0, taught.content[STATE]), ctx.dataset.split("public").subset(
        public_batch(tiny.seed, 2, len(ctx.dataset.split("public")), 8)), device.modalities).numpy()
    assert np.allclose(decode_any(bytes(reply["payload"])), expected, atol=1e-5)


def _model_of(ctx, device_id, state):
    from fedkd.device_models import model_key, unpack

    device = ctx.device(device_id)
    model = ctx.new_model(device.model_tier, modalities=device.modalities)
    model.load_state_dict(unpack(strip_heads(state), model_key(device.model_tier, device.modalities)))
    return model


def test_auxiliary_heads_one_per_neighbour_stay_in_the_devices_state(tiny):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    heard = {1: np.zeros((8, 10), np.float32), 5: np.ones((8, 10), np.float32)}
    first = gossip_task_of(tiny, gossip_task(0, 2, heard, aux_heads=True))
    # Next round only device 5 speaks: the head for device 1 is kept, unchanged.
    second = gossip_task_of(tiny, gossip_task(0, 3, {5: heard[5]}, aux_heads=True, state=first.content[STATE]))
    names = list(second.content[STATE].keys())
    heads = sorted(n.split("|")[-1] for n in names if "|aux." in n)
    assert heads == ["aux.1.bias", "aux.1.weight", "aux.5.bias", "aux.5.weight"]
    kept = [n for n in names if n.endswith("aux.1.weight")][0]
    assert np.array_equal(first.content[STATE][kept].numpy(), second.content[STATE][kept].numpy())
    assert not any("|aux." in n for n in strip_heads(second.content[STATE]).keys())


def test_a_neighbour_who_always_says_class_3_pulls_the_model_towards_class_3(tiny):
    # Prepare: a fresh model; the neighbour is sure every public sample is a 3.
    ctx = simulation_context(tiny)
    device = ctx.device(0)
    public = ctx.dataset.split("public")
    idx = np.arange(64)
    sure = np.zeros((64, 10))
    sure[:, 3] = 1.0
    model = ctx.new_model(device.model_tier, modalities=device.modalities)
    before = (predict_logits(model, public.subset(idx), device.modalities).argmax(1) == 3).float().mean()
    # Execute
    torch.manual_seed(0)
    outcome = train_with_neighbours(model, device.data, public, device.modalities, [Teacher(1, idx, sure)],
                                    epochs=3, batch_size=10, learning_rate=0.01, temperature=1.0,
                                    distill_weight=1.0, seed=0)
    # Assert
    after = (predict_logits(model, public.subset(idx), device.modalities).argmax(1) == 3).float().mean()
    assert after > max(before, 0.5)
    assert outcome.public_seen == 3 * 64 and outcome.private_seen == 3 * len(device.data)


# -- a whole run ---------------------------------------------------------------------------


def test_gossip_runs_serverless_with_mixed_architectures(write_scenario, tiny_scenario, tmp_path):
    tiny_scenario["population"]["classes"][0]["model_tier"] = "tiny"
    tiny_scenario["population"]["classes"][1] |= {"d2d_bps": 2e6, "d2d_latency_s": 0.02}
    tiny_scenario["strategy_defaults"] = {"min_available_nodes": 2}
    tiny_scenario["strategies"] = [
        {"name": "gossip_kd", "params": {"public_batch": 32}},
        {"name": "gossip_kd", "label": "heads_on_k_regular",
         "params": {"public_batch": 32, "topology": "k_regular", "degree": 3, "aux_heads": True}}]
    out = tmp_path / "gossip"
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    assert (rounds["bytes_up"] == 0).all() and (rounds["bytes_down"] == 0).all()
    trained = rounds[rounds["round"] > 0]
    assert (trained["d2d_bytes"] > 0).all() and trained["disagreement"].between(0, 1).all()
    assert {"accuracy_min", "accuracy_tier_tiny", "accuracy_tier_small", "graph_edges"} <= set(rounds.columns)
