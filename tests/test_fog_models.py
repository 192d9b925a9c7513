"""Fog models and cross-modal feature alignment, worked by hand where they can be."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkd.strategies.ra_cmkd.alignment import alignment_loss, info_nce, projection_head
from fedkd.strategies.ra_cmkd.fog_models import FogModels
from fedkd.architectures import Architecture
from fedkd.context import SimulationContext
from fedkd.scenario import Scenario
from fedkd.training import accuracy, predict_logits

AUDIO, IMAGE = Architecture("small", ("audio",)), Architecture("tiny", ("image",))


def test_info_nce_by_hand():
    # Two samples whose projections are orthogonal unit vectors, perfectly paired:
    # logits = I / 0.5, so each row's loss is -log(e^2 / (e^2 + e^0)) = log(1 + e^-2).
    a = torch.eye(2)
    assert float(info_nce(a, a, temperature=0.5)) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # Swapped pairs: each row's right partner scores e^0 against e^2: log(1 + e^2).
    assert float(info_nce(a, a.flip(0), temperature=0.5)) == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)


def head_parameters(tier: str, out_dim: int) -> int:
    return sum(p.numel() for p in projection_head(tier, out_dim, 0).parameters())


def test_heads_are_sized_by_tier():
    # tiny features are 16 wide: one linear map 16 -> 8 = 16 * 8 + 8 = 136 parameters;
    # small features are 32 wide: 32 -> 32 -> 8 = (32 * 32 + 32) + (32 * 8 + 8) = 1320.
    assert head_parameters("tiny", 8) == 136
    assert head_parameters("small", 8) == 1320
    assert head_parameters("base", 8) > head_parameters("small", 8)
    # The same seed gives the same head.
    assert torch.equal(projection_head("small", 8, 1)[0].weight, projection_head("small", 8, 1)[0].weight)


def test_alignment_pairs_only_different_modalities(tiny_scenario):
    ctx = SimulationContext(Scenario.model_validate(tiny_scenario))
    public = ctx.dataset.split("public").subset(np.arange(8))
    inputs = {m: torch.from_numpy(public.inputs[m]) for m in ("audio", "image")}
    audio_a, audio_b = ctx.new_model("small", modalities=("audio",)), ctx.new_model("tiny", modalities=("audio",))
    image = ctx.new_model("tiny", modalities=("image",))
    heads = [{"audio": projection_head("small", 4, 0)}, {"audio": projection_head("tiny", 4, 1)},
             {"image": projection_head("tiny", 4, 2)}]
    # Two audio models and nothing else: no pair to align.
    assert alignment_loss([audio_a, audio_b], heads[:2], inputs) is None
    # With an image model: two pairs (audio_a-image, audio_b-image), their mean.
    loss = alignment_loss([audio_a, audio_b, image], heads, inputs)
    z = [heads[0]["audio"](audio_a.encoders["audio"](inputs["audio"])),
         heads[1]["audio"](audio_b.encoders["audio"](inputs["audio"])),
         heads[2]["image"](image.encoders["image"](inputs["image"]))]
    expected = (info_nce(z[0], z[2]) + info_nce(z[1], z[2])) / 2
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


@pytest.fixture
def ctx(tiny_scenario):
    tiny_scenario["topology"] = {"fogs": 2, "assign": "hash"}
    return SimulationContext(Scenario.model_validate(tiny_scenario))


def test_distill_pulls_models_towards_their_targets_and_aligns(ctx):
    fogs = FogModels(ctx, epochs=3, learning_rate=3e-3, batch_size=16, align_weight=0.5)
    audio, image = fogs.model(0, AUDIO), fogs.model(0, IMAGE)
    public = ctx.dataset.split("public")
    idx = np.arange(32)
    # Targets: the true labels, softened. Distilling towards them must raise accuracy on them.
    probs = np.full((32, 10), 0.01, dtype=np.float32)
    probs[np.arange(32), public.labels[idx]] = 0.91
    before = [accuracy(m, public.subset(idx), a.modalities) for m, a in ((audio, AUDIO), (image, IMAGE))]
    loss, flops = fogs.distill(0, {AUDIO: (idx, probs), IMAGE: (idx, probs)}, server_round=1)
    after = [accuracy(m, public.subset(idx), a.modalities) for m, a in ((audio, AUDIO), (image, IMAGE))]
    assert after[0] > before[0] and after[1] > before[1]
    assert loss > 0
    # 3 epochs of 2 batches of 16, each model trained twice over (distillation, alignment).
    per_model = [ctx.train_flops_per_sample(a.tier, a.modalities) for a in (AUDIO, IMAGE)]
    assert flops == pytest.approx(sum(per_model) * 32 * 3 * 2)
    # Fog 1 was not touched.
    assert fogs.architectures(1) == []


def test_validation_keeps_the_better_weights(ctx):
    validation = np.arange(100, 160)
    fogs = FogModels(ctx, epochs=2, learning_rate=1e-2, batch_size=16, align_weight=0.0, validation=validation)
    model = fogs.model(0, AUDIO)
    public = ctx.dataset.split("public")
    held = public.subset(validation)

    def validation_loss(m) -> float:
        logits = predict_logits(m, held, AUDIO.modalities)
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(held.labels.astype(np.int64))))

    start = {k: v.clone() for k, v in model.state_dict().items()}
    loss_before = validation_loss(model)
    # Targets that are all class 0: distilling towards them raises the loss on the
    # validation labels, so the model keeps its start (epoch 0 is the best).
    idx = np.arange(64)
    wrong = np.zeros((64, 10), dtype=np.float32)
    wrong[:, 0] = 1.0
    fogs.distill(0, {AUDIO: (idx, wrong)}, server_round=1)
    assert validation_loss(model) == pytest.approx(loss_before)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    # Without validation the same distillation collapses the model onto class 0.
    unguarded = FogModels(ctx, epochs=2, learning_rate=1e-2, batch_size=16, align_weight=0.0)
    collapsed = unguarded.model(0, AUDIO)
    unguarded.distill(0, {AUDIO: (idx, wrong)}, server_round=1)
    assert (predict_logits(collapsed, held, AUDIO.modalities).argmax(1) == 0).all()
    assert validation_loss(collapsed) > loss_before
    # Targets that are the true labels lower the loss: the distilled weights are kept.
    right = np.full((64, 10), 0.01, dtype=np.float32)
    right[np.arange(64), public.labels[idx]] = 0.91
    fogs.distill(0, {AUDIO: (idx, right)}, server_round=2)
    assert validation_loss(model) < loss_before


def test_cloud_share_moves_each_fog_towards_the_mean(ctx):
    fogs = FogModels(ctx)
    a, b = fogs.model(0, AUDIO), fogs.model(1, AUDIO)
    with torch.no_grad():
        for p in a.parameters():
            p.fill_(1.0)
        for p in b.parameters():
            p.fill_(3.0)
    moved = fogs.share_through_cloud([0, 1], share=0.8)
    # Mean 2.0; fog 0: 0.2 * 1 + 0.8 * 2 = 1.8; fog 1: 0.2 * 3 + 0.8 * 2 = 2.2.
    assert all(torch.allclose(p, torch.full_like(p, 1.8)) for p in a.parameters())
    assert all(torch.allclose(p, torch.full_like(p, 2.2)) for p in b.parameters())
    size = sum(t.numel() * 4 for t in a.state_dict().values())
    assert moved == {0: size, 1: size}
    # A model only one fog holds has nothing to average with.
    fogs.model(0, IMAGE)
    assert fogs.share_through_cloud([0, 1], share=0.8) == {0: size, 1: size}


def test_state_round_trips(ctx):
    fogs = FogModels(ctx, pretrain_epochs=1, pretrain_samples=20)
    fogs.model(1, IMAGE)
    restored = FogModels(ctx, pretrain_epochs=1, pretrain_samples=20)
    restored.restore(fogs.state())
    public = ctx.dataset.split("public")
    assert torch.equal(predict_logits(fogs.models[(1, IMAGE)], public, IMAGE.modalities),
                       predict_logits(restored.models[(1, IMAGE)], public, IMAGE.modalities))
    # The pretraining FLOPs not yet reported travel with the state.
    assert restored.fresh_flops == fogs.fresh_flops and fogs.fresh_flops[1] > 0


def test_bad_settings_are_refused(ctx):
    for bad in ({"epochs": -1}, {"align_weight": -0.1}, {"align_dim": 0}, {"batch_size": 1}):
        with pytest.raises(ValueError):
            FogModels(ctx, **bad)
