"""FedDF through the simulated grid: per-architecture averaging and the ensemble teacher, by hand."""
from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedkd.contract import StrategyEnv
from fedkd.cli import main
from fedkd.labels import labelled_public, unlabelled_public
from fedkd.architectures import Architecture
from fedkd.context import SimulationContext
from fedkd.runtime.inprocess import InProcessGrid
from fedkd.protocol import task_of
from fedkd.scenario import PopulationSpec, WorldSpec, parse_scenario
from fedkd.sim.grid import NodeProfile, SimulatedGrid
from fedkd.sim.population import Population
from fedkd.sim.recorder import RoundRecorder
from fedkd.sim.world import DeviceWorld
from fedkd.strategies.feddf import FedDF, train_with_patience

from .conftest import TINY
from .test_grid import close

TINY_AUDIO, SMALL_IMAGE = Architecture("tiny", ("audio",)), Architecture("small", ("image",))
RECEIVED: dict[int, set[str]] = {}  # device -> the parameter names it was sent


def mixed_tiny() -> dict:
    """The tiny scenario with phones on the tiny tier (audio) and cameras on the small one (image)."""
    scenario = copy.deepcopy(TINY)
    scenario["population"]["classes"][0]["model_tier"] = "tiny"
    scenario["population"]["classes"][1]["model_tier"] = "small"
    return scenario


def filled_client(bias: dict[int, list[float]] | None = None) -> ClientApp:
    """Device d returns the model it was sent with every value set to d, from d + 1 examples;
    with ``bias``, all weights 0 and the head's bias given (so its logits are that bias for any input)."""
    app = ClientApp()

    @app.train("architecture")
    def train(message: Message, context) -> Message:
        device = int(task_of(message)["device_id"])
        sent = message.content["arrays"]
        RECEIVED[device] = set(sent.keys())
        out = {}
        for name, value in sent.items():
            filled = np.full(value.shape, float(device) if bias is None else 0.0, dtype=np.float32)
            if bias is not None and name == "head.bias":
                filled = np.asarray(bias.get(device, np.zeros(value.shape)), dtype=np.float32)
            out[name] = Array(filled)
        return Message(RecordDict({"arrays": ArrayRecord(out),
                                   "metrics": MetricRecord({"num-examples": device + 1, "train-loss": 0.0})}),
                       reply_to=message)

    return app


def profile(device: int) -> NodeProfile:
    # Devices 0, 1, 2 are tiny audio phones; device 3 is a small image camera.
    return (NodeProfile(device, "phone", "tiny", ("audio",)) if device < 3
            else NodeProfile(device, "camera", "small", ("image",)))


def run_feddf(strategy: FedDF, client: ClientApp, rounds: int = 1) -> RoundRecorder:
    RECEIVED.clear()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    strategy.fedkd_setup(StrategyEnv.of(SimulationContext(parse_scenario(mixed_tiny()))))
    cls = {"name": "dev", "share": 1.0, "compute_flops": 1e9, "uplink_bps": 1e6, "downlink_bps": 1e6,
           "jitter_sigma": 0.0, "availability": {"mean_online_s": 1e12, "mean_offline_s": 1e-3}}
    world = DeviceWorld(Population(PopulationSpec(devices=4, classes=[cls]), 0), WorldSpec(), 0)
    recorder = RoundRecorder("feddf", "feddf", world)
    grid = SimulatedGrid(InProcessGrid(client), world, recorder, seed=0, timeout_s=60, describe=profile)
    strategy.start(grid, ArrayRecord(), num_rounds=rounds, evaluate_fn=close(recorder))
    return recorder


def every_value(model) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel() for p in model.state_dict().values()])


def test_weights_are_averaged_within_each_architecture_only():
    # Prepare: devices 0, 1, 2 (tiny audio) and 3 (small image) return models full of their id,
    # from 1, 2, 3 and 4 examples. No distillation, so the round's result is FedAvg per architecture.
    strategy = FedDF(distill_epochs=0, fraction_train=1.0, fraction_evaluate=0.0,
                     min_train_nodes=4, min_available_nodes=4)
    # Execute
    recorder = run_feddf(strategy, filled_client())
    # Assert: tiny audio (0*1 + 1*2 + 2*3) / (1 + 2 + 3) = 8/6; small image is device 3 alone: 3.
    assert np.allclose(every_value(strategy.models[TINY_AUDIO]), 8 / 6)
    assert np.allclose(every_value(strategy.models[SMALL_IMAGE]), 3.0)
    assert recorder.run.rounds[-1].participants == 4


def test_each_device_is_sent_only_its_own_architecture():
    strategy = FedDF(distill_epochs=0, fraction_train=1.0, fraction_evaluate=0.0,
                     min_train_nodes=4, min_available_nodes=4)
    recorder = run_feddf(strategy, filled_client())
    # A phone gets an audio encoder only, a camera an image encoder only, each at its own width.
    assert RECEIVED[0] == set(strategy.models[TINY_AUDIO].state_dict())
    assert not any(k.startswith("encoders.image") for k in RECEIVED[0])
    assert RECEIVED[3] == set(strategy.models[SMALL_IMAGE].state_dict())
    down = {d.device_id: d.bytes_down for d in recorder.run.devices}
    assert down[0] == down[1] == down[2] < down[3]


def test_teacher_is_the_softened_mean_of_all_device_models_logits():
    # Prepare: every weight 0 but the head's bias, so a model's logits are its bias on any input.
    # Device 0 says [2, 0, ...], device 1 [0, 2, ...], devices 2 and 3 all zeros (10 classes).
    bias = {0: [2.0] + [0.0] * 9, 1: [0.0, 2.0] + [0.0] * 8}
    seen = {}

    class Spy(FedDF):
        def teacher(self, server_round, replies):
            seen["indices"], seen["targets"] = super().teacher(server_round, replies)
            return seen["indices"], seen["targets"]

    strategy = Spy(public_batch=32, distill_epochs=1, validation_samples=20, fraction_train=1.0,
                   fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4)
    # Execute
    run_feddf(strategy, filled_client(bias))
    # Assert: the mean logit over the 4 devices is [0.5, 0.5, 0, ..., 0] on every sample;
    # softmax: e^0.5 / (2 e^0.5 + 8) for classes 0 and 1, 1 / (2 e^0.5 + 8) for the other eight.
    denominator = 2 * math.exp(0.5) + 8
    assert seen["targets"].shape == (32, 10)
    assert seen["targets"][:, 0] == pytest.approx(math.exp(0.5) / denominator)
    assert seen["targets"][:, 1] == pytest.approx(math.exp(0.5) / denominator)
    assert seen["targets"][:, 9] == pytest.approx(1 / denominator)
    # The distillation samples never include the 20 held out for validation.
    assert not set(seen["indices"]) & set(strategy._validation) and len(strategy._validation) == 20


def test_validation_keeps_the_fused_model_when_distilling_would_hurt():
    # Prepare: the phones (tiny audio) all favour class `common`, the most frequent in the validation
    # set, with a logit of 1; the camera favours `rare`, the least frequent, with a logit of 20.
    # The teacher (mean logits: common 0.75, rare 5) says `rare`; a large distillation step follows it.
    probe = FedDF(validation_samples=50)
    probe.fedkd_setup(StrategyEnv.of(SimulationContext(parse_scenario(mixed_tiny()))))
    counts = np.bincount(probe.ctx.dataset.split("public").labels[probe._validation], minlength=10)
    common, rare = int(counts.argmax()), int(counts.argmin())
    assert counts[rare] < counts[common]
    bias = {d: np.eye(10)[common].tolist() for d in range(3)} | {3: (20 * np.eye(10)[rare]).tolist()}
    settings = dict(public_batch=32, distill_steps=1, distill_learning_rate=1.0, fraction_train=1.0,
                    fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4)
    # Execute
    kept, followed = FedDF(validation_samples=50, **settings), FedDF(validation_samples=0, **settings)
    run_feddf(kept, filled_client(bias))
    run_feddf(followed, filled_client(bias))
    # Assert: without validation the phones' model now predicts `rare`; with it, distilling scored
    # counts[rare] / 50 < counts[common] / 50, so the fused model (bias: 1 on `common`) is kept.
    assert followed.models[TINY_AUDIO].state_dict()["head.bias"].argmax() == rare
    assert np.allclose(kept.models[TINY_AUDIO].state_dict()["head.bias"].numpy(), np.eye(10)[common])


def test_patience_by_hand():
    # Prepare: a one-weight model; each step sets its weight to the number of steps taken, so the
    # weights kept name the check they came from. Scores per check (the first before any step):
    # 0.5, 0.6, 0.55, 0.55, 0.55, then 0.9 (never reached). A check every 20 steps, patience 2 checks.
    model = torch.nn.Linear(1, 1, bias=False)
    taken = [0]

    def step() -> float:
        taken[0] += 1
        with torch.no_grad():
            model.weight.fill_(taken[0])
        return float(taken[0])

    scores = iter([0.5, 0.6, 0.55, 0.55, 0.55, 0.9])
    # Execute
    run = train_with_patience(model, step, lambda: next(scores), steps=500, eval_every=20, patience=40)
    # Assert: the best check is the 2nd (step 20); at the 5th (step 80) it is 60 > 40 steps old: stop.
    # At the 4th (step 60) it was 40 steps old, not more than the patience: go on.
    assert [at for at, _ in run.checks] == [0, 20, 40, 60, 80]
    assert (run.steps, run.best_step, taken[0]) == (80, 20, 80)
    assert model.weight.item() == 20.0  # the 2nd check's weights
    assert run.mean_loss == pytest.approx(40.5)  # losses 1, 2, ..., 80


def test_patience_keeps_the_starting_weights_when_nothing_beats_them_and_stops_at_the_budget():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(-1.0)
    taken = [0]

    def step() -> float:
        taken[0] += 1
        with torch.no_grad():
            model.weight.fill_(taken[0])
        return 0.0

    # Never better than the start: stop at the first check more than 30 steps on (step 40).
    run = train_with_patience(model, step, lambda: 0.0, steps=500, eval_every=20, patience=30)
    assert (run.steps, run.best_step, model.weight.item()) == (40, 0, -1.0)
    # Always better (tuples compare as FedDF's (accuracy, -loss)): the budget ends it, with a check
    # after the last step although 50 is no multiple of 20; the last weights are kept.
    taken[0] = 0
    scores = iter([(0.5, -float(k)) for k in range(10, 0, -1)])
    run = train_with_patience(model, step, lambda: next(scores), steps=50, eval_every=20, patience=0)
    assert [at for at, _ in run.checks] == [0, 20, 40, 50]
    assert (run.steps, run.best_step, model.weight.item()) == (50, 50, 50.0)
    # Without a score every step runs and the last weights stay.
    taken[0] = 0
    run = train_with_patience(model, step, None, steps=7, eval_every=20, patience=0)
    assert (run.steps, run.checks, model.weight.item()) == (7, (), 7.0)


def test_a_teacher_that_only_hurts_is_given_up_after_the_patience():
    # The phones favour the validation set's most common class, the camera its rarest, loudly: the
    # teacher says `rare` and every check after the start scores below the fused model.
    probe = FedDF(validation_samples=50)
    probe.fedkd_setup(StrategyEnv.of(SimulationContext(parse_scenario(mixed_tiny()))))
    counts = np.bincount(probe.ctx.dataset.split("public").labels[probe._validation], minlength=10)
    common, rare = int(counts.argmax()), int(counts.argmin())
    bias = {d: np.eye(10)[common].tolist() for d in range(3)} | {3: (20 * np.eye(10)[rare]).tolist()}
    runs = {}

    class Spy(FedDF):
        def distill(self, server_round, replies):
            runs.update(super().distill(server_round, replies))
            return runs

    strategy = Spy(validation_samples=50, public_batch=32, distill_steps=500, eval_every=20, patience=40,
                   distill_learning_rate=1.0, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=4,
                   min_available_nodes=4)
    # Execute
    run_feddf(strategy, filled_client(bias))
    # Assert: for the phones' architecture the start (step 0) stays best; the check at step 60 is
    # 60 > 40 steps after it: stop there, well before the 500-step budget, and keep the fused model.
    # (The camera's fused model already says `rare`: the teacher does not hurt it.)
    assert (runs[TINY_AUDIO].steps, runs[TINY_AUDIO].best_step) == (60, 0)
    assert [at for at, _ in runs[TINY_AUDIO].checks] == [0, 20, 40, 60]
    assert np.allclose(strategy.models[TINY_AUDIO].state_dict()["head.bias"].numpy(), np.eye(10)[common])


def test_validation_is_the_runs_labelled_public_samples_and_never_distilled_on():
    # Prepare
    ctx = SimulationContext(parse_scenario(mixed_tiny()))
    size, seed = len(ctx.dataset.split("public")), ctx.scenario.seed
    strategy, none = FedDF(validation_samples=30), FedDF(validation_samples=0)
    # Execute
    strategy.fedkd_setup(StrategyEnv.of(ctx))
    none.fedkd_setup(StrategyEnv.of(ctx))
    # Assert: the first 30 of the run's labelled order (what any strategy with 30 labels reads),
    # the rest is the distillation pool; reported as read for validation.
    assert np.array_equal(strategy._validation, labelled_public(seed, size, 30))
    assert np.array_equal(strategy._unlabeled, unlabelled_public(seed, size, 30))
    read = strategy.fedkd_labels_read()
    assert list(read) == ["validation"] and np.array_equal(read["validation"], labelled_public(seed, size, 30))
    assert none.fedkd_labels_read() == {} and len(none._unlabeled) == size


def test_distill_epochs_gives_the_budget_in_passes_and_zero_switches_distillation_off():
    runs = {}

    class Spy(FedDF):
        def distill(self, server_round, replies):
            runs.update(super().distill(server_round, replies))
            return runs

    # 2 passes over 40 samples in batches of 16 (the last of a pass dropped): 2 * ceil(40 / 16) = 6 steps.
    strategy = Spy(public_batch=40, distill_epochs=2, distill_batch_size=16, validation_samples=0,
                   fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=4, min_available_nodes=4)
    run_feddf(strategy, filled_client({0: [1.0] + [0.0] * 9}))
    assert {run.steps for run in runs.values()} == {6}
    assert not FedDF(distill_epochs=0).distills and not FedDF(distill_steps=0).distills
    assert FedDF(distill_steps=0, distill_epochs=1).distills


@pytest.mark.parametrize("params, message", [
    ({"distill_steps": -1}, "distill_steps"), ({"patience": -1}, "patience"), ({"eval_every": 0}, "eval_every"),
    ({"distill_batch_size": 0}, "distill_batch_size"), ({"distill_epochs": -1}, "distill_epochs"),
])
def test_bad_distillation_settings_are_refused(params, message):
    with pytest.raises(ValueError, match=message):
        FedDF(**params)


def test_feddf_runs_on_mixed_tiers_where_fedavg_is_refused(write_scenario, tiny_scenario, tmp_path, capsys):
    # Prepare: phones (audio) on the tiny tier, cameras (image) on the small one.
    scenario = mixed_tiny()
    scenario["strategies"] = [{"name": "feddf", "params": {"public_batch": 64, "distill_steps": 20}}]
    path = write_scenario(scenario)
    # Execute
    assert main(["simulate", str(path), "--out", str(tmp_path / "df")]) == 0
    refused = main(["simulate", str(path), "--strategy", "fedavg", "--out", str(tmp_path / "avg")])
    # Assert
    rounds = pd.read_csv(tmp_path / "df" / "rounds.csv")
    assert rounds["round"].max() == 2 and (rounds["participants"].iloc[1:] > 0).all()
    assert {"accuracy_tier_tiny", "accuracy_tier_small", "accuracy_arch_tiny_audio",
            "accuracy_arch_small_image", "accuracy_min"} <= set(rounds.columns)
    # 7 of the 12 devices are tiny audio phones, 5 small image cameras: the headline weighs them so.
    last = rounds.iloc[-1]
    assert last["accuracy"] == pytest.approx((7 * last["accuracy_arch_tiny_audio"]
                                              + 5 * last["accuracy_arch_small_image"]) / 12)
    devices = pd.read_csv(tmp_path / "df" / "devices.csv")
    down = devices.groupby("device_class")["bytes_down"].max()
    assert down["phone"] < down["camera"]  # a tiny audio model is smaller than a small image one
    assert refused == 2 and "model tiers" in capsys.readouterr().err
    assert not (tmp_path / "avg").exists()
