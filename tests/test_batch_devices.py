"""backend.batch_devices on the run path: a phase's device tasks of one architecture and
configuration run as one batched computation, equal to one by one up to float rounding.

Tolerance: every weight within 1e-4 absolute + 1e-4 relative of the one-by-one reply,
logits and metrics within 1e-3 absolute + 1e-4 relative; FLOPs (and so simulated times and
energy) and payload sizes exactly equal. Looser than tests/test_batched.py's single training
call (1e-5): here the weights come from whole rounds (transfer step, distillation, training,
several rounds apart) and Adam, which divides by the root of small second moments, magnifies
rounding (measured here: 1 weight in 9,216 off by 5.9e-5; DS-FL's logits off by up to 2.2e-4).

Float rounding can also decide a near-tie at a ReLU or max-pool, after which a device's
training takes the other branch: in one case found (tiny model, 64 public samples, 14 Adam
steps of distillation) one device in four ended 2.7e-2 away, and the one-by-one code itself
ends exactly as far away when its inputs move by 1e-7. Batching changes the rounding as
another BLAS or thread count would. These tests use seed 6, with no such tie (so do seeds 4
and 5; with seed 3, DS-FL's devices meet one and 33 weights of one device end 1.3e-3 away)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedkd.cli import main
from fedkd.codecs import decode_any
from fedkd.contract import BatchedTask, FedkdStrategy
from fedkd.device_tasks import tasks_of
from fedkd.errors import FedkdError, ScenarioError
from fedkd.protocol import COST
from fedkd.runtime.client import FedkdClientApp
from fedkd.scenario import parse_scenario

from .test_processes import assert_processes_match_inprocess

ATOL, RTOL = 1e-4, 1e-4  # weights
OUTPUT_ATOL = 1e-3  # logits and metrics

# One strategy per family: weights (FedAvg), the proximal term (FedProx), a model per
# architecture (FedDF's train.architecture), logits with distillation towards the server's
# targets and FedMD's transfer step (FedMD, DS-FL).
FAMILIES = [
    {"name": "fedavg", "params": {"fraction_evaluate": 0.0}},
    {"name": "fedprox", "params": {"fraction_evaluate": 0.0, "proximal_mu": 0.1}},
    {"name": "feddf", "params": {"fraction_evaluate": 0.0, "distill_steps": 5, "patience": 2}},
    {"name": "fedmd", "params": {"public_pretrain_epochs": 1, "public_pretrain_samples": 20}},
    "dsfl",
    # Devices that start from their fog's model (ra_cmkd, two fogs).
    {"name": "ra_cmkd", "topology": {"fogs": 2, "assign": "hash"}},
]


@pytest.fixture
def compared(monkeypatch):
    """Every batched unit the run makes, with its replies and the one-by-one replies."""
    units = []
    batched = FedkdClientApp.run_batch

    def run_batch(self, messages, context):
        replies = batched(self, messages, context)
        units.append((replies, [self(m, context) for m in messages]))
        return replies

    monkeypatch.setattr(FedkdClientApp, "run_batch", run_batch)
    return units


def _assert_same_reply(got, expected):
    assert not got.has_error() and not expected.has_error()
    assert sorted(got.content.keys()) == sorted(expected.content.keys())
    for key, record in expected.content.items():
        mine = got.content[key]
        if key == COST:  # FLOPs: the simulated time and energy, exactly
            assert dict(mine) == dict(record)
        elif isinstance(record, ArrayRecord):
            a, b = mine.to_torch_state_dict(), record.to_torch_state_dict()
            assert list(a) == list(b)
            for name in b:
                torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{key}/{name}: {m}")
        elif isinstance(record, MetricRecord):
            assert dict(mine) == pytest.approx(dict(record), rel=RTOL, abs=OUTPUT_ATOL)
        elif isinstance(record, ConfigRecord) and "payload" in record:
            np.testing.assert_allclose(decode_any(bytes(mine["payload"])), decode_any(bytes(record["payload"])),
                                       atol=OUTPUT_ATOL, rtol=RTOL)
            assert len(bytes(mine["payload"])) == len(bytes(record["payload"]))  # the traffic counted
        else:
            assert dict(mine) == dict(record)


@pytest.mark.parametrize("strategy", FAMILIES, ids=lambda s: s if isinstance(s, str) else s["name"])
def test_batched_replies_equal_one_by_one(write_scenario, tiny_scenario, tmp_path, compared, strategy):
    # Prepare: three rounds (the logit strategies digest targets from round 2 on), batches of 4.
    strategy = strategy if isinstance(strategy, str) else dict(strategy)
    if "topology" in strategy:
        tiny_scenario["topology"] = strategy.pop("topology")
    tiny_scenario.update(rounds=3, strategies=[strategy], seed=6)
    tiny_scenario["strategy_defaults"].pop("fraction_evaluate")
    tiny_scenario["backend"] = {"batch_devices": 4}
    # Execute
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(tmp_path / "out")]) == 0
    # Assert: batches were made (of at most 4), and every reply matches its one-by-one twin.
    sizes = [len(replies) for replies, _ in compared]
    assert sizes and max(sizes) <= 4 and min(sizes) >= 2
    for replies, alone in compared:
        for got, expected in zip(replies, alone):
            _assert_same_reply(got, expected)


def test_processes_and_inprocess_make_the_same_batches(write_scenario, tiny_scenario, tmp_path):
    # FedMD batched (units planned from the messages alone), once per backend.
    tiny_scenario.update(rounds=3, strategies=["fedmd"])
    tiny_scenario["strategy_defaults"].pop("fraction_evaluate")
    tiny_scenario["backend"] = {"batch_devices": 3}
    assert_processes_match_inprocess(tiny_scenario, write_scenario, tmp_path)


def test_a_batch_that_fails_runs_one_by_one(write_scenario, tiny_scenario, tmp_path, monkeypatch):
    # Prepare: a batched form that always raises, against batching off.
    tiny_scenario["strategies"] = [{"name": "fedprox", "params": {"proximal_mu": 0.1}}]
    off = write_scenario(tiny_scenario)
    tiny_scenario["backend"] = {"batch_devices": 4}
    on = write_scenario(tiny_scenario, "on.yaml")
    calls = []

    def broken(self, messages, context):
        calls.append(len(messages))
        raise RuntimeError("no")

    # Execute
    assert main(["simulate", str(off), "--out", str(tmp_path / "off")]) == 0
    monkeypatch.setattr(FedkdClientApp, "run_batch", broken)
    assert main(["simulate", str(on), "--out", str(tmp_path / "on")]) == 0
    # Assert: it was tried, and the one-by-one fallback gives the unbatched files exactly.
    assert calls
    for name in ("rounds.csv", "devices.csv"):
        assert (tmp_path / "off" / name).read_bytes() == (tmp_path / "on" / name).read_bytes(), name


def test_batch_units_group_by_key_in_order_and_cap_the_size(tiny_scenario):
    # Prepare: an app whose units are planned for 7 FedAvg-style messages of two sensor sets.
    from fedkd.runtime.client import make_client_app

    tiny_scenario["backend"] = {"batch_devices": 2}
    scenario = parse_scenario(tiny_scenario, "tiny.yaml")
    app = make_client_app(scenario)
    assert isinstance(app, FedkdClientApp)
    messages = _train_messages(scenario, [0, 1, 2, 3, 4, 5, 6])
    kinds = [scenario_device_modalities(scenario, d) for d in range(7)]
    # Execute
    units = app.batch_units(messages, context=None)
    # Assert: every message once; a unit is one sensor set, at most 2, in first-message order.
    assert sorted(i for unit in units for i in unit) == list(range(7))
    assert all(len(unit) <= 2 and len({kinds[i] for i in unit}) == 1 for unit in units)
    assert [unit[0] for unit in units] == sorted(unit[0] for unit in units)
    assert any(len(unit) == 2 for unit in units)


def scenario_device_modalities(scenario, device_id):
    from fedkd.context import simulation_context

    return simulation_context(scenario).device(device_id).modalities


def _train_messages(scenario, devices):
    """FedAvg's train messages for ``devices``, as the simulated grid hands them on."""
    from flwr.app import Message, RecordDict

    from fedkd.context import simulation_context
    from fedkd.protocol import with_task

    model = simulation_context(scenario).new_model(scenario.training.model_tier)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({})})
    return [Message(with_task(content, d, 1, scenario.seed), 1001, "train", group_id="1") for d in devices]


def test_batch_devices_must_be_positive(tiny_scenario):
    tiny_scenario["backend"] = {"batch_devices": 0}
    with pytest.raises(ScenarioError, match="backend.batch_devices"):
        parse_scenario(tiny_scenario, "s.yaml")


class _Stray(FedkdStrategy):
    device_tasks = {}
    batched_tasks = {"train.stray": BatchedTask(lambda call: None, lambda calls: [])}


def test_a_batched_form_of_no_device_task_is_refused_before_the_run(monkeypatch):
    import fedkd.device_tasks as device_tasks

    monkeypatch.setattr(device_tasks, "resolve_strategy", lambda name: type("R", (), {"cls": _Stray}))
    with pytest.raises(FedkdError, match="batched task 'train.stray' is not one of its device_tasks"):
        tasks_of(["stray"])
