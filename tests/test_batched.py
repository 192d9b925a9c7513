"""Batched device training equals training device by device, up to float rounding.

Tolerance: every weight within 1e-5 absolute + 1e-4 relative of the one-by-one
result, every mean loss within 1e-5 relative (vmapped kernels sum in another
order; float32 rounding is about 1e-7 a step)."""
from __future__ import annotations

import pytest
import torch

from fedkd.batched import batchable, train_batched
from fedkd.context import simulation_context
from fedkd.scenario import parse_scenario
from fedkd.training import train_local

ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture
def ctx(tiny_scenario):
    # One torch thread, as device tasks run: tiny kernels on several threads of a busy
    # machine take many times longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield simulation_context(parse_scenario(tiny_scenario, "tiny.yaml"))
    torch.set_num_threads(threads)


def _devices(ctx, modality: str, count: int):
    found = [ctx.device(d) for d in range(ctx.scenario.population.devices)]
    chosen = [d for d in found if d.modalities == (modality,)][:count]
    assert len(chosen) == count and len({len(d.data) for d in chosen}) > 1  # unequal shards: masks matter
    return chosen


@pytest.mark.parametrize("modality", ["image", "audio"])
@pytest.mark.parametrize("optimizer, mu", [("adam", 0.0), ("sgd", 0.0), ("adam", 0.1)])
def test_batched_training_equals_one_by_one(ctx, modality, optimizer, mu):
    # Prepare: the same starting weights for both ways (a global model, as FedAvg/FedProx send).
    devices = _devices(ctx, modality, 3)
    start = ctx.new_model("tiny").state_dict()
    seeds = [100 + d.device_id for d in devices]
    args = dict(epochs=2, batch_size=4, learning_rate=0.01, proximal_mu=mu, optimizer=optimizer)
    one_by_one, together = [], []
    for d in devices:
        for models in (one_by_one, together):
            model = ctx.new_model("tiny")
            model.load_state_dict(start)
            models.append(model)
    # Execute
    expected = [train_local(m, d.data, d.modalities, seed=s, **args) for m, d, s in zip(one_by_one, devices, seeds)]
    got = train_batched(together, [d.data for d in devices], (modality,), seeds=seeds, **args)
    # Assert: the weights moved (the test can fail) and agree; so do the reported losses.
    for a, b in zip(one_by_one, together):
        for (name, wa), wb, w0 in zip(a.state_dict().items(), b.state_dict().values(), start.values()):
            if name.startswith(f"encoders.{modality}.") or name.startswith("head."):
                assert not torch.equal(wa, w0), name
            torch.testing.assert_close(wb, wa, atol=ATOL, rtol=RTOL, msg=name)
    assert [g.num_examples for g in got] == [e.num_examples for e in expected]
    for g, e in zip(got, expected):
        assert g.mean_loss == pytest.approx(e.mean_loss, rel=1e-5)


def test_self_distillation_is_left_to_one_by_one():
    assert batchable("adam", None) and batchable("sgd", None)
    assert not batchable("adam", object())
