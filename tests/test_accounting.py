"""Accounting: energy adds up, bytes are the serialised payload plus a stated overhead, and
FedProx's proximal term moves a weight exactly as worked out by hand.

The tiny runs execute fedkd's real ClientApp handlers, wrapped so that the test
sees each reply the device produced; the simulated grid then times and counts
that reply as in any run.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.clientapp import ClientApp
from torch import nn

from fedkd.codecs import get_codec
from fedkd.data.base import Split
from fedkd.results import StrategyRun
from fedkd.runtime.backends import run_backend
from fedkd.contract import DeviceCall
from fedkd.device_tasks import tasks_of
from fedkd.context import simulation_context
from fedkd.protocol import COST, STATE, task_of
from fedkd.runtime.server import StrategyJob, make_server_app
from fedkd.scenario import parse_scenario
from fedkd.training import train_local

from .conftest import TINY

Replies = dict[tuple[int, int, str], Message]  # (round, device, message type) -> the device's reply


def recording_client(scenario, replies: Replies) -> ClientApp:
    """fedkd's own ClientApp handlers, each reply also kept in ``replies``."""
    app = ClientApp()

    def recorded(handler):
        def run(message: Message, context) -> Message:
            torch.set_num_threads(1)  # as fedkd's client does
            reply = handler(DeviceCall(simulation_context(scenario), message))
            task = task_of(message)
            replies[(int(task["round"]), int(task["device_id"]), message.metadata.message_type)] = reply
            return reply

        return run

    for message_type, (_, handler) in tasks_of(s.name for s in scenario.strategies).items():
        category, _, action = message_type.partition(".")
        register = getattr(app, category)
        (register(action) if action else register())(recorded(handler))
    return app


def run_recorded(raw: dict) -> tuple[list[StrategyRun], list[Replies], object]:
    """Every strategy of ``raw`` on the in-process backend, with each one's replies."""
    scenario = parse_scenario(raw)
    runs, replies = [], []
    for spec in scenario.strategies:
        sink, seen = [], {}
        run_backend(scenario.backend, make_server_app(StrategyJob(scenario, spec), sink),
                    recording_client(scenario, seen))
        runs.extend(sink)
        replies.append(seen)
    return runs, replies, scenario


@pytest.fixture(scope="module")
def tiny_runs():
    """Two rounds of FedAvg (weights) and FedMD (fp32 logits on 16 public samples) in the tiny scenario."""
    raw = copy.deepcopy(TINY)
    raw["strategies"] = ["fedavg", {"name": "fedmd", "params": {"public_batch": 16, "codec": "fp32"}}]
    return run_recorded(raw)


def ok_train_rows(run: StrategyRun):
    rows = [d for d in run.devices if d.phase == "train" and d.status == "ok"]
    assert rows, f"{run.label}: no completed training task"
    return rows


# -- energy ------------------------------------------------------------------------------------

def test_a_rounds_energy_is_the_sum_of_its_devices_task_energies(tiny_runs):
    runs, _, _ = tiny_runs
    for run in runs:
        assert [r.round for r in run.rounds] == [0, 1, 2]
        for record in run.rounds:
            tasks = [d for d in run.devices if d.round == record.round]
            # RoundRecord.energy_j is what the round's tasks (train and evaluate, ok or failed)
            # spent, nothing else: no idle drain, no server work. The same floats, possibly summed
            # in another order, hence approx with a relative 1e-12.
            assert record.energy_j == pytest.approx(sum(d.energy_j for d in tasks), rel=1e-12, abs=0.0)
            assert record.bytes_up == sum(d.bytes_up for d in tasks)
            assert record.bytes_down == sum(d.bytes_down for d in tasks)
        # Round 0 is the initial model's evaluation: no task, no energy. Later rounds train.
        assert run.rounds[0].energy_j == 0.0 and all(r.energy_j > 0 for r in run.rounds[1:])


def test_a_completed_tasks_energy_is_its_bytes_and_flops_times_the_class_costs(tiny_runs):
    runs, replies, scenario = tiny_runs
    classes = {c.name: c for c in scenario.population.classes}
    for run, seen in zip(runs, replies):
        for d in ok_train_rows(run):
            reply = next(r for (rnd, dev, _), r in seen.items() if (rnd, dev) == (d.round, d.device_id))
            flops = float(reply.content[COST]["flops"])  # what the client says it computed
            c = classes[d.device_class]
            # The class defaults: 5e-7 J per byte down, 1e-9 J per FLOP, 1e-6 J per byte up;
            # a task that completes runs each stage in full (no device-to-device radio here).
            expected = (d.bytes_down * c.energy_per_byte_down_j + flops * c.energy_per_flop_j
                        + d.bytes_up * c.energy_per_byte_up_j)
            assert d.energy_j == pytest.approx(expected, rel=1e-9), (run.label, d)


# -- bytes ---------------------------------------------------------------------------------------

def varint_len(n: int) -> int:
    """Bytes of a protobuf varint holding n >= 0: 7 bits per byte."""
    return max(1, math.ceil(n.bit_length() / 7))


def config_bytes_framing(key: str, payload_len: int) -> int:
    """Bytes Flower 1.41 adds around a ConfigRecord holding one bytes value ``{key: payload}``.

    The object is ``ConfigRecord`` + " " + (no children) + " " + <body length in digits> + "\\0",
    then the protobuf body: one Item (tag 1 + its length), whose key is a string (tag + length +
    the key's bytes) and whose value (tag 2 + its length) is a ConfigRecordValue holding the bytes
    (tag 6 + their length + the payload)."""
    value = 1 + varint_len(payload_len) + payload_len
    item = 1 + len(key) + varint_len(len(key)) + 1 + varint_len(value) + value
    body = 1 + varint_len(item) + item
    header = len("ConfigRecord") + 2 + len(str(body)) + 1
    return header + body - payload_len


def test_a_logit_replys_bytes_up_is_the_codecs_size_plus_the_stated_overhead(tiny_runs):
    # Where bytes are counted: the simulated grid (fedkd.sim.grid, _run_phase) takes
    # payload_bytes(reply.content) (fedkd.protocol): Flower's serialised objects of every
    # record the strategy sees, fedkd's own "fedkd." records (the FLOPs, the device's state) left
    # out. The world moves exactly those bytes up (a completed uplink moves all of them).
    runs, replies, scenario = tiny_runs
    run, seen = runs[1], replies[1]
    assert run.label == "fedmd"
    num_classes = simulation_context(scenario).dataset.num_classes
    for d in ok_train_rows(run):
        reply = seen[(d.round, d.device_id, "train.logits")].content
        payload = reply["logits"]["payload"]
        # The payload is the codec's, for 16 public samples x 10 classes: fp32's size.
        assert len(payload) == get_codec("fp32").encoded_size(16, num_classes)
        # The overhead: Flower's framing of the "logits" ConfigRecord around the payload
        # (36 bytes for this size: a 18-byte object header and 18 bytes of protobuf tags and
        # lengths), plus the whole "metrics" MetricRecord (num-examples, train-loss, distill-loss).
        framing = config_bytes_framing("payload", len(payload))
        overhead = framing + len(reply["metrics"].deflate())
        assert d.bytes_up == len(payload) + overhead
        assert framing == 36
        # The device's own model travels back as its state, thousands of bytes that are not
        # counted: in a real deployment the device keeps it.
        assert STATE in reply and sum(len(a.data) for a in reply[STATE].values()) > 10_000


def test_a_weight_replys_bytes_up_is_the_models_parameters_plus_the_stated_overhead(tiny_runs):
    runs, replies, scenario = tiny_runs
    run, seen = runs[0], replies[0]
    assert run.label == "fedavg"
    ctx = simulation_context(scenario)
    # FedAvg's shared model: 4 bytes (float32) per parameter of the whole multimodal net,
    # counted from the model itself, not from the reply.
    model = ctx.new_model(scenario.training.model_tier)
    parameter_bytes = 4 * sum(t.numel() for t in model.state_dict().values())
    for d in ok_train_rows(run):
        reply = seen[(d.round, d.device_id, "train")].content
        arrays: ArrayRecord = reply["arrays"]
        # The overhead, per array: the .npy header numpy writes before the data; Flower's Array
        # object (an object header with its id, and JSON metadata: dtype, shape, chunk ids); the
        # header of its one data chunk ("ArrayChunk  <length>\0"). Per record: the ArrayRecord
        # object (a header with the arrays' ids, and JSON mapping names to them). Plus the whole
        # "metrics" MetricRecord.
        per_array = {}
        for name, array in arrays.items():
            data_bytes = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
            npy_header = len(array.data) - data_bytes
            chunks = list(array.children.values())
            assert len(chunks) == 1  # all arrays are below Flower's 5 MiB chunk size
            chunk_header = len(f"ArrayChunk  {len(array.data)}") + 1
            per_array[name] = npy_header + len(array.deflate()) + chunk_header
            assert npy_header == 128  # numpy's format 1.0 header, padded to 64-byte blocks
        overhead = sum(per_array.values()) + len(arrays.deflate()) + len(reply["metrics"].deflate())
        assert d.bytes_up == parameter_bytes + overhead
        # About 300 bytes of framing per array (14 arrays), about 2.2 kB for the ArrayRecord (each
        # array's 64-hex-digit id twice) and 62 for the metrics: 6,566 bytes on 88,616 of
        # parameters, 7 % of this small model.
        assert all(250 < b < 400 for b in per_array.values()), per_array
        assert overhead < 0.1 * parameter_bytes


# -- FedProx's proximal term, by hand --------------------------------------------------------

class OneWeight(nn.Module):
    """Logits [w, 0] for every sample: a one-parameter, two-class model."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, inputs):
        zeros = torch.zeros(len(inputs["x"]))
        return torch.stack([self.w.expand_as(zeros), zeros], dim=1)


def two_samples_of_class_0() -> Split:
    return Split({"x": np.zeros((2, 1), dtype=np.float32)}, np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize("mu", [0.0, 2.0])
def test_the_proximal_term_changes_the_sgd_step_as_worked_out_by_hand(mu):
    # Prepare: the global weight w_g = 0; two identical samples of class 0, batch size 1, one epoch:
    # two SGD steps at lr = 1. The loss is cross-entropy of logits [w, 0] for class 0:
    #   L(w) = log(1 + e^-w),  dL/dw = -1 / (1 + e^w).
    # FedProx adds (mu / 2) (w - w_g)^2, whose gradient is mu (w - w_g): one SGD step is
    #   w <- w - lr * (dL/dw + mu * (w - w_g)).
    # Step 1 at w = 0: dL/dw = -1/2, and w - w_g = 0, so w1 = 0 + 1/2 = 0.5 whatever mu is.
    # Step 2 at w = 0.5: dL/dw = -1 / (1 + e^0.5) = -0.377541; the proximal gradient mu * 0.5:
    #   mu = 0: w2 = 0.5 + 0.377541 = 0.877541;   mu = 2: w2 = 0.5 + 0.377541 - 1.0 = -0.122459.
    # The mean loss the task reports: (L(0) + L(0.5) + (mu / 2) * 0.5^2) / 2, the proximal term
    # being 0 at step 1: mu = 0: (0.693147 + 0.474077) / 2; mu = 2: (0.693147 + 0.474077 + 0.25) / 2.
    model = OneWeight(0.0)
    lr, w_g = 1.0, 0.0
    w1 = w_g - lr * (-1 / (1 + math.exp(w_g)))
    w2 = w1 - lr * (-1 / (1 + math.exp(w1)) + mu * (w1 - w_g))
    loss = (math.log(1 + math.exp(-w_g)) + math.log(1 + math.exp(-w1)) + mu / 2 * (w1 - w_g) ** 2) / 2
    # Execute
    outcome = train_local(model, two_samples_of_class_0(), ("x",), epochs=1, batch_size=1, learning_rate=lr,
                          seed=0, proximal_mu=mu, optimizer="sgd")
    # Assert
    assert w1 == pytest.approx(0.5)
    assert w2 == pytest.approx({0.0: 0.877541, 2.0: -0.122459}[mu], abs=1e-6)
    assert float(model.w.detach()) == pytest.approx(w2, rel=1e-6)
    assert outcome.mean_loss == pytest.approx(loss, rel=1e-6)
    assert outcome.num_examples == 2
