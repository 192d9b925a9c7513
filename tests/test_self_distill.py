"""LSSKD-style self-distillation: auxiliary heads during local training, gone at inference."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from fedkd.cli import main
from fedkd.data.base import ModalitySpec, Split
from fedkd.errors import ScenarioError
from fedkd.models import build_model
from fedkd.scenario import SelfDistillSpec, parse_scenario
from fedkd.self_distill import AuxiliaryHeads, head_train_flops, self_distillation_loss, tap_points
from fedkd.training import train_local

CAMERA = ModalitySpec("camera", (1, 4, 4), "image")
SENSOR = ModalitySpec("sensor", (2, 8), "series")
LN3 = math.log(3)


def shard(n: int = 12, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split({"camera": rng.standard_normal((n, 1, 4, 4)).astype(np.float32),
                  "sensor": rng.standard_normal((n, 2, 8)).astype(np.float32)},
                 rng.integers(0, 2, n).astype(np.int64))


def tiny_model():
    return build_model((CAMERA, SENSOR), 2, "tiny", seed=0)


def test_loss_composition_by_hand():
    # Prepare: one sample of class 0, T = 2. Head a1 = [0, 0] learns from the deeper head a2 = [2 ln 3, 0];
    # a2 learns from the final classifier z = [2 ln 3, 0].
    a1, a2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[2 * LN3, 0.0]])
    z, y = torch.tensor([[2 * LN3, 0.0]]), torch.tensor([0])
    # Execute
    plain = self_distillation_loss(z, [a1, a2], [a2, z], y, temperature=2.0)
    ensemble = self_distillation_loss(z, [a1, a2], [a2, z], y, temperature=2.0, ensemble_teaches_final=True)
    # Assert. softmax(a2 / 2) = softmax([ln 3, 0]) = [3/4, 1/4].
    # a1: CE = ln 2; KD = 4 * (3/4 ln(3/4 / 1/2) + 1/4 ln(1/4 / 1/2)) = 4 * (0.75 ln 1.5 - 0.25 ln 2) = 0.523248.
    # a2: CE = -ln(9/10) = ln(10/9) = 0.105361; KD from z = 0 (same distribution).
    # R = (0.693147 + 0.523248 + 0.105361 + 0) / 2 = 0.660878.
    kd_a1 = 4 * (0.75 * math.log(1.5) - 0.25 * math.log(2))
    expected = (math.log(2) + kd_a1 + math.log(10 / 9)) / 2
    assert float(plain) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.660878, abs=1e-6)
    # Ensemble of the heads at T = 2: mean([1/2, 1/2], [3/4, 1/4]) = [5/8, 3/8] teaches z, whose
    # softened output is [3/4, 1/4]: 4 * (5/8 ln(5/8 / 3/4) + 3/8 ln(3/8 / 1/4)) = 0.152393.
    kd_final = 4 * (0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(0.375 / 0.25))
    assert float(ensemble) == pytest.approx(expected + kd_final, rel=1e-6)
    assert kd_final == pytest.approx(0.152393, abs=1e-6)


def test_heads_tap_each_convolution_block_of_each_encoder():
    model = tiny_model()
    heads = AuxiliaryHeads(model, seed=0)
    # Image encoders: [Standardize, Conv, ReLU, MaxPool, Conv, ReLU, pool, flatten, Linear, ReLU]:
    # tap the ReLUs at 2 and 5; series encoders have no standardizer, so 1 and 4.
    assert tap_points(model.encoders["camera"]) == [(2, 8), (5, 16)]
    assert tap_points(model.encoders["sensor"]) == [(1, 8), (4, 16)]
    assert {k: (h.in_features, h.out_features) for k, h in heads.heads.items()} == {
        "camera_0": (8, 2), "camera_1": (16, 2), "sensor_0": (8, 2), "sensor_1": (16, 2)}


def test_regularizer_chains_each_encoders_heads_towards_the_final_classifier():
    # Prepare: capture one forward pass with the heads on.
    model, data = tiny_model(), shard()
    heads = AuxiliaryHeads(model, seed=0)
    x, y = {m: torch.from_numpy(v) for m, v in data.inputs.items()}, torch.from_numpy(data.labels)
    spec = SimpleNamespace(weight=0.3, temperature=3.0, ensemble_teaches_final=False)
    with heads.attached():
        z = model(x)
        features = dict(heads._features)
        got = heads.regularizer(z, y, spec)
    # Assert: weight * R with camera_0 <- camera_1 <- z and sensor_0 <- sensor_1 <- z.
    a = {k: heads.heads[k](f) for k, f in features.items()}
    expected = 0.3 * self_distillation_loss(
        z, [a["camera_0"], a["camera_1"], a["sensor_0"], a["sensor_1"]],
        [a["camera_1"], z, a["sensor_1"], z], y, temperature=3.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_heads_leave_the_model_its_predictions_and_its_state_dict():
    # Prepare
    model, data = tiny_model(), shard()
    x = {m: torch.from_numpy(v) for m, v in data.inputs.items()}
    keys = list(model.state_dict())
    # Execute: predictions with the heads hanging on, then a training call with self-distillation.
    with torch.no_grad():
        before = model(x)
        with AuxiliaryHeads(model, seed=0).attached():
            during = model(x)
    train_local(model, data, ("camera", "sensor"), epochs=2, batch_size=4, learning_rate=0.01, seed=1,
                self_distillation=SelfDistillSpec())
    # Assert: same predictions while attached; afterwards the exchanged state_dict has the same
    # keys, no hook is left, and a fresh model loaded from the state_dict predicts exactly the same.
    assert torch.equal(before, during)
    assert list(model.state_dict()) == keys
    assert not any(m._forward_hooks for m in model.modules())
    fresh = tiny_model()
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


def trained_weights(self_distillation, optimizer="adam") -> list[np.ndarray]:
    model = tiny_model()
    train_local(model, shard(), ("camera", "sensor"), epochs=2, batch_size=4, learning_rate=0.01, seed=1,
                optimizer=optimizer, self_distillation=self_distillation)
    return [p.detach().numpy().copy() for p in model.parameters()]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_zero_weight_regularizer_trains_exactly_like_none(optimizer):
    # The heads' seeding, hooks and extra optimizer parameters do not disturb the model's training.
    off = trained_weights(None, optimizer)
    zero = trained_weights(SimpleNamespace(weight=0.0, temperature=3.0, ensemble_teaches_final=False), optimizer)
    on = trained_weights(SelfDistillSpec(weight=0.3, temperature=3.0), optimizer)
    assert all(np.array_equal(a, b) for a, b in zip(off, zero))
    assert not all(np.array_equal(a, b) for a, b in zip(off, on))


def test_heads_cost_is_counted():
    # A head Linear(c, k) costs 2ck forward and 4ck backward (input and weight grads): 6ck a sample.
    assert head_train_flops(8, 10) == 480 and head_train_flops(16, 10) == 960
    # Two classes, heads of 8 and 16 channels per encoder: 6 * 2 * (8 + 16) = 288 per modality.
    model = tiny_model()
    outcome = train_local(model, shard(n=12), ("camera",), epochs=3, batch_size=4, learning_rate=0.01,
                          seed=1, self_distillation=SelfDistillSpec())
    assert outcome.extra_flops == 288 * 12 * 3
    both = train_local(model, shard(n=12), ("camera", "sensor"), epochs=1, batch_size=4, learning_rate=0.01,
                       seed=1, self_distillation=SelfDistillSpec())
    assert both.extra_flops == 2 * 288 * 12
    assert train_local(model, shard(), ("camera",), epochs=1, batch_size=4, learning_rate=0.01,
                       seed=1).extra_flops == 0.0


def test_scenario_switch(tiny_scenario):
    assert parse_scenario(tiny_scenario).training.self_distillation is None
    tiny_scenario["training"]["self_distillation"] = {"weight": 0.3, "temperature": 3.0}
    spec = parse_scenario(tiny_scenario).training.self_distillation
    assert (spec.weight, spec.temperature, spec.ensemble_teaches_final) == (0.3, 3.0, False)
    tiny_scenario["training"]["self_distillation"] = {"wieght": 0.3}
    with pytest.raises(ScenarioError, match=r"training\.self_distillation\.wieght"):
        parse_scenario(tiny_scenario, "s.yaml")


def test_fedavg_with_self_distillation_moves_the_same_bytes_and_spends_more_energy(
        write_scenario, tiny_scenario, tmp_path):
    # The exchanged model is unchanged, so every byte count is; the heads' FLOPs cost energy.
    tiny_scenario["strategies"] = ["fedavg"]
    plain = tmp_path / "plain"
    assert main(["simulate", str(write_scenario(tiny_scenario, "plain.yaml")), "--out", str(plain)]) == 0
    tiny_scenario["training"]["self_distillation"] = {"weight": 0.3, "temperature": 3.0}
    lsskd = tmp_path / "lsskd"
    assert main(["simulate", str(write_scenario(tiny_scenario, "lsskd.yaml")), "--out", str(lsskd)]) == 0
    a, b = pd.read_csv(plain / "devices.csv"), pd.read_csv(lsskd / "devices.csv")
    assert a[["round", "device_id", "status"]].equals(b[["round", "device_id", "status"]])
    assert a["bytes_up"].equals(b["bytes_up"]) and a["bytes_down"].equals(b["bytes_down"])
    ok = a["status"] == "ok"
    assert (b.loc[ok, "energy_j"].to_numpy() > a.loc[ok, "energy_j"].to_numpy()).all()


def test_heads_are_reinitialised_for_every_task(monkeypatch):
    # Prepare: record the heads each training call builds, with their weights as built.
    import fedkd.training as training

    built = []

    class Recorded(AuxiliaryHeads):
        def __init__(self, model, seed):
            super().__init__(model, seed)
            built.append((seed, {k: v.clone() for k, v in self.state_dict().items()}))

    monkeypatch.setattr(training, "AuxiliaryHeads", Recorded)
    model = tiny_model()
    # Execute: two tasks on the same model, the second with the first task's seed again.
    for _ in range(2):
        train_local(model, shard(), ("camera", "sensor"), epochs=2, batch_size=4, learning_rate=0.01, seed=7,
                    self_distillation=SelfDistillSpec())
    # Assert: each task built new heads, at random from its seed alone: the second task's heads start
    # exactly where the first's did, nothing learnt in the first carried over.
    assert len(built) == 2
    (seed_1, first), (seed_2, second) = built
    assert seed_1 == seed_2 == 7 and all(torch.equal(first[k], second[k]) for k in first)
    assert all(torch.equal(first[k], v) for k, v in AuxiliaryHeads(tiny_model(), seed=7).state_dict().items())
