"""The score cache (fedkd.scoring.ScoreCache): unchanged weights are not scored again,
changed ones always are, and reusing a score never changes a number."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from flwr.app import ArrayRecord

import fedkd.training
from fedkd.architectures import Architecture, new_model
from fedkd.context import SimulationContext
from fedkd.device_models import model_key, pack
from fedkd.protocol import torch_state_dict
from fedkd.runtime.server import global_model_columns
from fedkd.scenario import parse_scenario
from fedkd.scoring import (PanelModel, ScoreCache, evaluation_panel, global_model, own_model, score_panel,
                           weights_fingerprint)

from .conftest import TINY


@pytest.fixture(scope="module")
def ctx() -> SimulationContext:
    return SimulationContext(parse_scenario(copy.deepcopy(TINY)))


@pytest.fixture
def scorings(monkeypatch) -> list:
    """Every model actually scored on the test split (the cache's misses), in order."""
    scored = []
    real = fedkd.training.accuracy

    def counting(model, data, modalities):
        scored.append(tuple(modalities))
        return real(model, data, modalities)

    monkeypatch.setattr(fedkd.training, "accuracy", counting)
    return scored


def constant_model(ctx: SimulationContext, tier: str, modalities: tuple[str, ...] | None,
                   label: int) -> torch.nn.Module:
    """A model (on every modality when ``modalities`` is None) that predicts ``label`` for
    every input (weights 0, head bias one-hot)."""
    model = ctx.new_model(tier) if modalities is None else new_model(ctx, Architecture(tier, modalities))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.head.bias[label] = 1.0
    return model


def label_shares(ctx: SimulationContext) -> np.ndarray:
    return np.bincount(ctx.test_split.labels, minlength=ctx.dataset.num_classes) / len(ctx.test_split)


def own_state(ctx, device, label: int) -> dict:
    """The device state of ``device`` holding a constant model of its architecture."""
    model = constant_model(ctx, device.model_tier, device.modalities, label)
    return {device.device_id: pack(None, model_key(device.model_tier, device.modalities), model.state_dict())}


def test_unchanged_weights_are_not_scored_again_and_changed_ones_are(ctx, scorings):
    # Prepare: one panel device whose own model always says the test set's commonest label.
    device = evaluation_panel(ctx)[0]
    shares = label_shares(ctx)
    common = int(np.argmax(shares))
    scores = ScoreCache(ctx.test_split)

    def score(state: dict) -> float:
        scores.new_round()
        accuracy, _ = score_panel(ctx, [device], lambda d: own_model(ctx, d, state), scores=scores)
        return accuracy

    # Round 1 scores it; round 2, the same weights in a new state object: reused, same number.
    state = own_state(ctx, device, common)
    first = score(state)
    assert first == pytest.approx(shares[common]) and len(scorings) == 1
    again = score(own_state(ctx, device, common))
    assert again == first and len(scorings) == 1

    # Round 3: one weight one float32 step (ulp) larger; predictions stay, but it is scored again.
    nudged = constant_model(ctx, device.model_tier, device.modalities, common)
    with torch.no_grad():
        nudged.head.weight.view(-1)[0] = float(np.nextafter(np.float32(0), np.float32(1)))
    key = model_key(device.model_tier, device.modalities)
    assert score({device.device_id: pack(None, key, nudged.state_dict())}) == first and len(scorings) == 2

    # Round 4: another label: scored again, with the new number.
    rare = int(np.argmin(shares))
    assert score(own_state(ctx, device, rare)) == pytest.approx(shares[rare]) and len(scorings) == 3


def test_a_device_that_never_trained_is_scored_once_with_its_initial_model(ctx, scorings):
    device = evaluation_panel(ctx)[0]
    scores = ScoreCache(ctx.test_split)
    results = []
    for _ in range(3):
        scores.new_round()
        results.append(score_panel(ctx, [device], lambda d: own_model(ctx, d, {}), scores=scores)[0])
    # Scored once; the reused number is the one a fresh cache (a resumed run) computes.
    fresh, _ = score_panel(ctx, [device], lambda d: own_model(ctx, d, {}))
    assert results == [fresh] * 3 and len(scorings) == 2


def test_the_global_models_columns_reuse_what_the_panel_scored(ctx, scorings):
    # Prepare: a global model; the panel holds audio-only and image-only devices.
    panel = evaluation_panel(ctx)
    arrays = torch_state_dict(ArrayRecord(constant_model(ctx, ctx.scenario.training.model_tier, None, 1)
                                          .state_dict()))
    scores = ScoreCache(ctx.test_split)

    def one_round() -> tuple:
        scores.new_round()
        shared = global_model(ctx, arrays)
        return score_panel(ctx, panel, lambda d: shared, scores=scores), global_model_columns(ctx, shared, scores)

    # Execute: round 1 scores audio, image (the panel) and audio+image (a column only); round 2 nothing.
    first = one_round()
    assert sorted(scorings) == [("audio",), ("audio", "image"), ("image",)]
    assert one_round() == first and len(scorings) == 3
    # Assert: the same numbers as without a cache.
    assert (score_panel(ctx, panel, lambda d: global_model(ctx, arrays)),
            global_model_columns(ctx, global_model(ctx, arrays))) == first


def test_only_the_last_round_is_remembered(ctx, scorings):
    device = evaluation_panel(ctx)[0]
    scores = ScoreCache(ctx.test_split)
    one, two = own_state(ctx, device, 1), own_state(ctx, device, 2)
    for state in (one, two, one):  # round 2 did not use round 1's entry: it is gone by round 3
        scores.new_round()
        score_panel(ctx, [device], lambda d: own_model(ctx, d, state), scores=scores)
    assert len(scorings) == 3
    assert len(scores._previous) + len(scores._current) == 2  # bounded: at most two rounds' entries


def test_a_live_model_without_a_fingerprint_is_scored_again_once_changed_in_place(ctx, scorings):
    # Prepare: a strategy's server-side model, handed out as is (as FedDF's are).
    device = evaluation_panel(ctx)[0]
    live = constant_model(ctx, device.model_tier, device.modalities, 1)
    scores = ScoreCache(ctx.test_split)

    def score() -> float:
        scores.new_round()
        return score_panel(ctx, [device], lambda d: PanelModel("architecture", lambda: live), scores=scores)[0]

    first = score()
    assert score() == first and len(scorings) == 1
    with torch.no_grad():
        live.head.bias[1] = 0.0
        live.head.bias[2] = 1.0
    assert score() == pytest.approx(label_shares(ctx)[2]) and len(scorings) == 2


def test_the_fingerprint_is_exact_and_names_dtypes_and_shapes():
    weights = {"w": torch.zeros(4), "b": torch.ones(2)}
    same = {"w": torch.zeros(4), "b": torch.ones(2)}
    assert weights_fingerprint(weights) == weights_fingerprint(same)
    flipped = {"w": torch.zeros(4), "b": torch.ones(2)}
    flipped["w"].view(torch.uint8)[0] = 1  # one bit of one byte
    assert weights_fingerprint(flipped) != weights_fingerprint(weights)
    # The same bytes under another name, dtype or shape are other weights.
    assert weights_fingerprint({"v": torch.zeros(4), "b": torch.ones(2)}) != weights_fingerprint(weights)
    assert weights_fingerprint({"w": torch.zeros(4, dtype=torch.int32), "b": torch.ones(2)}) \
        != weights_fingerprint(weights)
    assert weights_fingerprint({"w": torch.zeros(2, 2), "b": torch.ones(2)}) != weights_fingerprint(weights)
    # Numpy arrays hash as the tensors they hold; anything else cannot be keyed exactly.
    assert weights_fingerprint({"w": np.zeros(4, np.float32), "b": np.ones(2, np.float32)}) \
        == weights_fingerprint(weights)
    assert weights_fingerprint({"w": "zeros"}) is None


def test_a_cache_of_another_test_split_is_refused(ctx):
    other = ctx.test_split.subset(np.arange(10))
    with pytest.raises(ValueError, match="another test split"):
        score_panel(ctx, evaluation_panel(ctx)[:1], lambda d: own_model(ctx, d, {}), scores=ScoreCache(other))
