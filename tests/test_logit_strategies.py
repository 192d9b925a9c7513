"""Logit-exchange strategies (FedMD, DS-FL) through the simulated grid, by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedkd.contract import StrategyEnv
from fedkd.cli import main
from fedkd.codecs import decode_any, get_codec
from fedkd.labels import labelled_public
from fedkd.logit_exchange import PublicSet
from fedkd.protocol import task_of
from fedkd.strategies.dsfl import DSFL
from fedkd.strategies.fedmd import FedMD

from .test_grid import close, make_grid

RECEIVED: list[ConfigRecord] = []


def logit_client() -> ClientApp:
    """Device d predicts logits [d, 0] for every public sample it is asked about."""
    app = ClientApp()

    @app.train("logits")
    def train(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        config = message.content["config"]
        RECEIVED.append(config)
        rows = len(config["public-indices"])
        logits = np.tile(np.array([float(device), 0.0], dtype=np.float32), (rows, 1))
        return Message(RecordDict({
            "logits": ConfigRecord({"payload": get_codec(config["codec"]).encode(logits)}),
            "metrics": MetricRecord({"num-examples": device + 1, "train-loss": 0.0}),
        }), reply_to=message)

    return app


def run_rounds(strategy, rounds: int):
    RECEIVED.clear()
    grid, recorder = make_grid(logit_client())
    strategy.fedkd_setup(StrategyEnv(public=PublicSet(size=50, num_classes=2, seed=0)))
    strategy.start(grid, ArrayRecord(), num_rounds=rounds, evaluate_fn=close(recorder))
    return recorder


def test_fedmd_consensus_is_the_mean_logit_softened():
    # Devices 0, 1, 2 send logits [d, 0]: consensus [1, 0]; softmax -> [e / (1 + e), 1 / (1 + e)].
    strategy = FedMD(fraction_train=1.0, min_available_nodes=3, public_batch=4)
    run_rounds(strategy, rounds=1)
    assert strategy.targets.shape == (4, 2)
    assert strategy.targets[:, 0] == pytest.approx(math.e / (1 + math.e))


def test_second_round_sends_the_consensus_for_the_first_rounds_samples():
    strategy = FedMD(fraction_train=1.0, min_available_nodes=3, public_batch=4, downlink_codec="fp16")
    run_rounds(strategy, rounds=2)
    first, second = RECEIVED[0], RECEIVED[-1]
    assert "targets" not in first
    assert second["target-indices"] == first["public-indices"]
    assert decode_any(bytes(second["targets"]))[:, 0] == pytest.approx(math.e / (1 + math.e), abs=1e-3)


def test_dsfl_sharpens_the_averaged_soft_labels():
    # Probabilities of [d, 0]: device 0 [0.5, 0.5], 1 [0.731, 0.269], 2 [0.881, 0.119];
    # weighted by 1, 2, 3 examples: p0 = (0.5 + 2*0.7311 + 3*0.8808) / 6 = 0.7674.
    # ERA at T = 0.5: softmax([p0, 1 - p0] / 0.5) -> 1 / (1 + exp(-(2 p0 - 1) / 0.5)).
    strategy = DSFL(era_temperature=0.5, fraction_train=1.0, min_available_nodes=3, public_batch=4)
    run_rounds(strategy, rounds=1)
    p0 = (0.5 + 2 * (1 / (1 + math.exp(-1))) + 3 * (1 / (1 + math.exp(-2)))) / 6
    assert strategy.targets[0, 0] == pytest.approx(1 / (1 + math.exp(-(2 * p0 - 1) / 0.5)), rel=1e-6)


def test_bad_codec_name_fails_at_construction():
    with pytest.raises(ValueError, match="codec"):
        FedMD(codec="gzip")


def test_logit_strategies_run_with_mixed_architectures_and_move_far_fewer_bytes(
        write_scenario, tiny_scenario, tmp_path):
    tiny_scenario["population"]["classes"][0]["model_tier"] = "tiny"
    tiny_scenario["population"]["classes"][1]["model_tier"] = "small"
    tiny_scenario["strategy_defaults"] = {"fraction_train": 0.5, "min_available_nodes": 2}
    tiny_scenario["strategies"] = [{"name": "fedmd", "params": {"codec": "int8", "public_batch": 64}},
                                   {"name": "dsfl", "params": {"codec": "int8", "public_batch": 64}}]
    out = tmp_path / "logits"
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    assert {"accuracy_tier_tiny", "accuracy_tier_small", "accuracy_min"} <= set(rounds.columns)
    trained = rounds[rounds["participants"] > 0]
    per_participant = (trained["bytes_up"] / trained["participants"]).max()
    # int8 logits of 64 samples x 10 classes: 20 header + 64*4 scales + 640 values = 916 bytes,
    # plus record overhead; a FedAvg model update here is tens of kilobytes.
    assert get_codec("int8").encoded_size(64, 10) == 916
    assert per_participant < 2_000


def test_fedmd_pretrains_on_public_labels_by_default_and_dsfl_does_not():
    # FedMD's transfer step is on by default: every task says so, and the samples are reported.
    fedmd = FedMD(fraction_train=1.0, min_available_nodes=3, public_batch=4)
    run_rounds(fedmd, rounds=1)
    assert {(c["public-pretrain-epochs"], c["public-pretrain-samples"]) for c in RECEIVED} == {(1, 512)}
    # The public set here has 50 samples: a device pretrains on all of them (512 > 50).
    read = fedmd.fedkd_labels_read()
    assert list(read) == ["transfer"] and read["transfer"].tolist() == list(range(50))
    # DS-FL reads no labels; either strategy can switch the step on or off.
    dsfl = DSFL(fraction_train=1.0, min_available_nodes=3, public_batch=4)
    run_rounds(dsfl, rounds=1)
    assert {c["public-pretrain-epochs"] for c in RECEIVED} == {0} and dsfl.fedkd_labels_read() == {}
    off = FedMD(public_pretrain_epochs=0)
    off.fedkd_setup(StrategyEnv(public=PublicSet(size=50, num_classes=2, seed=0)))
    assert off.fedkd_labels_read() == {}
    some = DSFL(public_pretrain_epochs=2, public_pretrain_samples=20)
    some.fedkd_setup(StrategyEnv(public=PublicSet(size=50, num_classes=2, seed=0)))
    # The first 20 of the run's labelled order (fedkd.labels), the samples any budget of 20 reads.
    assert some.fedkd_labels_read()["transfer"].tolist() == labelled_public(0, 50, 20).tolist()


def test_fedmd_reports_exactly_the_samples_its_devices_pretrain_on(write_scenario, tiny_scenario, tmp_path,
                                                                   monkeypatch):
    # Prepare: record what the client trains on; FedMD pretrains on 16 public samples.
    import fedkd.logit_exchange as client
    from fedkd.context import simulation_context
    from fedkd.scenario import parse_scenario

    calls = []
    real = client.train_local

    def spy(model, data, modalities, **kwargs):
        calls.append((data, tuple(modalities), kwargs["epochs"]))
        return real(model, data, modalities, **kwargs)

    monkeypatch.setattr(client, "train_local", spy)
    tiny_scenario["rounds"] = 1
    tiny_scenario["strategy_defaults"] = {"fraction_train": 0.5, "min_available_nodes": 2}
    tiny_scenario["strategies"] = [{"name": "fedmd", "params": {"public_batch": 8, "public_pretrain_samples": 16}}]
    # Execute
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(tmp_path / "md")]) == 0
    # Assert: each device of the round trained twice, first on the reported public samples, once.
    public = simulation_context(parse_scenario(tiny_scenario)).dataset.split("public")
    strategy = FedMD(public_pretrain_samples=16)
    strategy.fedkd_setup(StrategyEnv(public=PublicSet(size=len(public), num_classes=10, seed=3)))
    expected = public.subset(strategy.fedkd_labels_read()["transfer"])
    pretraining = [(data, mods, epochs) for data, mods, epochs in calls if len(data) == 16 and epochs == 1
                   and np.array_equal(data.labels, expected.labels)]
    assert len(pretraining) == len(calls) // 2 > 0
    for data, mods, _ in pretraining:
        assert all(np.array_equal(data.inputs[m], expected.inputs[m]) for m in mods)
