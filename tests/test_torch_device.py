"""backend.torch_device: models and batches go where the scenario says; a GPU that
is not there stops the run before anything runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedkd.cli import main
from fedkd.data.base import Split
from fedkd.distill import distill_on
from fedkd.context import SimulationContext, resolve_torch_device
from fedkd.scenario import parse_scenario
from fedkd.training import model_device, predict_logits, to_tensors, train_local

NO_CUDA = not torch.cuda.is_available()


class Recorder(nn.Module):
    """A linear classifier that notes the device of every batch it sees."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.seen: set[torch.device] = set()

    def forward(self, inputs):
        self.seen |= {x.device for x in inputs.values()}
        return self.linear(inputs["x"])


def _split(n: int = 6) -> Split:
    rng = np.random.default_rng(0)
    return Split({"x": rng.normal(size=(n, 3)).astype(np.float32)}, rng.integers(0, 2, n),
                 np.zeros(n, dtype=np.int64), {})


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(write_scenario, tiny_scenario, tmp_path, capsys):
    tiny_scenario["backend"] = {"torch_device": "cuda"}
    out = tmp_path / "out"
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "backend.torch_device" in err and "no CUDA device" in err
    assert not out.exists()  # nothing ran


def test_auto_is_cuda_exactly_when_torch_sees_one():
    assert resolve_torch_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_torch_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_new_models_are_placed_on_the_configured_device(tiny_scenario, device):
    tiny_scenario["backend"] = {"torch_device": device}
    ctx = SimulationContext(parse_scenario(tiny_scenario, "s.yaml"))
    model = ctx.new_model("tiny")
    assert {p.device for p in model.parameters()} == {resolve_torch_device(device)}
    # The same initial weights as a model built for the default (cpu) scenario.
    reference = SimulationContext(parse_scenario({**tiny_scenario, "backend": {}}, "s.yaml")).new_model("tiny")
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a.cpu(), b), name


def test_training_prediction_and_distillation_feed_batches_where_the_model_is():
    model, data = Recorder(), _split()
    train_local(model, data, ["x"], epochs=1, batch_size=4, learning_rate=0.1, seed=1, proximal_mu=0.1)
    distill_on(model, data, ["x"], np.full((6, 2), 0.5, dtype=np.float32), epochs=1, batch_size=4,
               learning_rate=0.1, temperature=2.0, seed=2)
    logits = predict_logits(model, data, ["x"])
    assert model.seen == {model_device(model)} == {torch.device("cpu")}
    assert logits.device == torch.device("cpu") and logits.shape == (6, 2)


def test_to_tensors_moves_only_when_asked():
    data = _split()
    shared = to_tensors(data, ["x"])["x"]
    assert shared.data_ptr() == data.inputs["x"].__array_interface__["data"][0]  # no copy on the CPU
    assert to_tensors(data, ["x"], torch.device("meta"))["x"].device == torch.device("meta")


def test_a_model_without_parameters_is_on_the_cpu():
    assert model_device(nn.ReLU()) == torch.device("cpu")
