"""Checkpoints and --resume: a run stopped at any moment ends as if it never stopped.

The decisive test kills ``fedkd simulate`` with SIGKILL twice, resumes it
twice, and compares rounds.csv byte for byte with an uninterrupted run; its
FedMD devices keep their models in a state store whose cache is smaller than
one model, so they live on disk (fedkd.sim.state_store).
"""
from __future__ import annotations

import copy
import functools
import io
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fedkd.checkpoint import CheckpointError, CheckpointStore, encode
from fedkd.cli import main
from fedkd.report import devices_frame, rounds_frame
from fedkd.runner import run_scenario
from fedkd.scenario import parse_scenario
from fedkd.sim.state_store import DeviceStateStore

from .conftest import REPO, TINY


def two_strategies(rounds: int = 3) -> dict:
    scenario = copy.deepcopy(TINY)
    scenario["rounds"] = rounds
    scenario["strategy_defaults"] = {"fraction_train": 0.5, "min_available_nodes": 2}
    scenario["strategies"] = [{"name": "fedavg", "params": {"fraction_evaluate": 0.0}},
                              {"name": "fedmd", "params": {"public_batch": 16}}]
    return scenario


def restless_world(scenario: dict) -> dict:
    """Devices that go offline, change link quality, miss deadlines, report with noise; two fogs."""
    scenario["world"].update(round_deadline_s=1.2, telemetry={"report_interval_s": 0.5, "noise_sigma": 0.2})
    scenario["topology"] = {"fogs": 2, "assign": "hash"}
    for device_class in scenario["population"]["classes"]:
        device_class.update(
            availability={"mean_online_s": 2.0, "mean_offline_s": 1.0},
            quality=[{"name": "good", "mean_duration_s": 1.0},
                     {"name": "bad", "mean_duration_s": 0.5, "bandwidth_factor": 0.2}])
    return scenario


class Stop(BaseException):  # a kill's stand-in: not an error the run reports
    """Raised from the progress hook: the run stops right after a round's checkpoint."""


def stop_at(round_number: int):
    def progress(label, record, total):
        if record.round == round_number:
            raise Stop(label)

    return progress


def as_csv(runs) -> tuple[str, str]:
    return (rounds_frame(runs).to_csv(index=False, lineterminator="\n"),
            devices_frame(runs).to_csv(index=False, lineterminator="\n"))



def resumed_after_stops(scenario, tmp_path) -> tuple[int, list[str], list[str]]:
    """Run ``scenario`` whole; then again, stopped after round 2 of each strategy and resumed
    each time. Returns (stops, the uninterrupted run's CSVs, the resumed run's CSVs)."""
    uninterrupted = as_csv(run_scenario(scenario))
    store = CheckpointStore(tmp_path, scenario)
    stops, resume = 0, False
    while True:
        try:
            runs = run_scenario(scenario, stop_at(2), store, resume=resume)
            return stops, uninterrupted, as_csv(runs)
        except Stop:
            stops, resume = stops + 1, True


def test_every_strategy_state_survives_a_stop_after_each_round(tmp_path):
    # Prepare: strategies that keep state between rounds (targets, fog views, per-architecture
    # models, device models), in a world whose devices fail in every way.
    raw = restless_world(two_strategies(rounds=3))
    raw["strategy_defaults"] = {}
    raw["strategies"] = [{"name": "ra_cmkd", "params": {"public_batch": 16, "fraction_train": 0.5}},
                         {"name": "feddf", "params": {"public_batch": 16, "fraction_evaluate": 0.0,
                                                      "distill_epochs": 1, "validation_samples": 10}}]
    scenario = parse_scenario(raw)
    uninterrupted = as_csv(run_scenario(scenario))
    store = CheckpointStore(tmp_path, scenario)
    # Execute: stop after round 2 of each strategy, resume each time.
    stops, resume = 0, False
    while True:
        try:
            runs = run_scenario(scenario, stop_at(2), store, resume=resume)
            break
        except Stop:
            stops, resume = stops + 1, True
    # Assert
    assert stops == 2
    assert as_csv(runs) == uninterrupted
    assert "offline" in uninterrupted[1] and "deadline" in uninterrupted[1]


def test_a_run_killed_twice_and_resumed_twice_writes_the_same_rounds_csv(write_scenario, tmp_path):
    # Prepare: the uninterrupted run, and the same scenario for a run to kill. FedMD's devices
    # keep their models; a 10 KB cache holds none of them, so every read and write is on disk.
    raw = two_strategies()
    raw["backend"] = {"state_cache_mb": 0.01}
    path = write_scenario(raw)
    assert main(["simulate", str(path), "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    store = CheckpointStore(out, parse_scenario(raw))

    def simulate(*extra) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "fedkd", "simulate", str(path), "--out", str(out), *extra],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def kill_when(proc: subprocess.Popen, ready) -> str:
        deadline, seen = time.monotonic() + 120, None
        while proc.poll() is None and time.monotonic() < deadline:
            # Read the checkpoints only when one was rewritten: reading takes a core from the run.
            files = sorted((p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in store.folder.glob("*.pt")
                           if p.exists()) if store.folder.is_dir() else []
            if files != seen:
                seen = files
                try:
                    if ready(store.inspect()):
                        proc.send_signal(signal.SIGKILL)
                        break
                except (CheckpointError, FileNotFoundError):
                    seen = None  # caught mid-rename: look again
            time.sleep(0.01)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err
        return err

    # Execute: kill during FedAvg's rounds; resume and kill during FedMD's; resume to the end.
    kill_when(simulate(), lambda found: found.get("fedavg", {}).get("rounds", 0) >= 1)
    second = kill_when(simulate("--resume"),
                       lambda found: found.get("fedmd", {}).get("rounds", 0) >= 1 and not found["fedmd"]["complete"])
    last = subprocess.run([sys.executable, "-m", "fedkd", "simulate", str(path), "--out", str(out), "--resume"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    # Assert
    assert "resuming from" in second and "fedavg after round" in second
    assert last.returncode == 0 and "fedavg done, fedmd after round" in last.stderr, last.stderr
    for name in ("rounds.csv", "devices.csv"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not (out / ".checkpoint").exists() and not (out / ".state").exists()


def test_a_two_seed_run_resumes_each_seed_and_strategy_where_it_stopped(tmp_path, write_scenario, capsys):
    # Prepare: two seeds of two strategies, two rounds each; the uninterrupted run.
    raw = two_strategies(rounds=2)
    raw["seeds"] = [0, 1]
    scenario = parse_scenario(raw)
    uninterrupted = as_csv(run_scenario(scenario))
    store = CheckpointStore(tmp_path, scenario)
    # Execute: stop after round 1 of every (seed, strategy), resume each time.
    stops, resume, labels = 0, False, []
    while True:
        try:
            runs = run_scenario(scenario, stop_at(1), store, resume=resume)
            break
        except Stop as stop:
            labels.append(str(stop))
            if stops == 2:  # seed 0 done, seed 1's fedavg stopped: what --resume would report
                found = store.inspect()
            stops, resume = stops + 1, True
    # Assert: one checkpoint per (seed, strategy); rows as if never stopped, by strategy then seed.
    assert labels == ["fedavg seed 0", "fedmd seed 0", "fedavg seed 1", "fedmd seed 1"]
    assert found == {"fedavg seed 0": {"complete": True, "rounds": 2}, "fedmd seed 0": {"complete": True, "rounds": 2},
                     "fedavg seed 1": {"complete": False, "rounds": 1}}
    assert sorted(p.name for p in store.folder.glob("*.pt")) == [
        "seed0-0-fedavg.pt", "seed0-1-fedmd.pt", "seed1-0-fedavg.pt", "seed1-1-fedmd.pt"]
    assert as_csv(runs) == uninterrupted
    assert [(run.label, run.seed) for run in runs] == [("fedavg", 0), ("fedavg", 1), ("fedmd", 0), ("fedmd", 1)]
    # A checkpoint of these two seeds is no checkpoint of three, nor of one of them alone.
    for other, message in (([0, 1, 2], "it is for seeds [0, 1], not seeds [0, 1, 2]"),
                           ([1], "it is for seeds [0, 1], not seed 1")):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            CheckpointStore(tmp_path, parse_scenario({**raw, "seeds": other})).inspect()


# -- safety and refusals ------------------------------------------------------------

def _saved_checkpoint(tmp_path, raw: dict | None = None) -> CheckpointStore:
    """A real checkpoint: a tiny run stopped after round 1."""
    if raw is None:
        raw = two_strategies(rounds=2)
        raw["strategies"] = raw["strategies"][1:]  # FedMD: device state and targets
    scenario = parse_scenario(raw)
    store = CheckpointStore(tmp_path, scenario)
    with pytest.raises(Stop):
        run_scenario(scenario, stop_at(1), store)
    return store


def _only_plain_data(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _only_plain_data(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_only_plain_data(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))


def test_checkpoints_hold_only_tensors_and_plain_data_and_load_with_weights_only(tmp_path):
    # Prepare
    store = _saved_checkpoint(tmp_path)
    [path] = list(store.folder.glob("*.pt"))
    # Execute: torch's restricted unpickler, which refuses any object that is not plain data.
    raw = torch.load(path, weights_only=True)
    # Assert
    assert _only_plain_data(raw)
    assert raw["label"] == "fedmd" and not raw["complete"]
    assert len(raw["run"]["rounds"]) == 2  # rounds 0 and 1
    # The devices' own models are not in the checkpoint, which names the round of their store.
    assert "device_state" not in raw["state"]["grid"] and raw["state"]["grid"]["state_round"] == 1
    states = DeviceStateStore(store.state_path(0, "fedmd"), identity=store.state_identity("fedmd"), resume=True)
    assert len(states) > 0 and all(round_ == 1 for round_, in states._db.execute("SELECT round FROM state"))
    states.close()


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    # Prepare: a file whose unpickling would create a marker file.
    marker = tmp_path / "pwned"
    store = _saved_checkpoint(tmp_path)
    [path] = list(store.folder.glob("*.pt"))

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buffer = io.BytesIO()
    torch.save({"format": 1, "identity": store.identity, "label": "fedmd", "evil": Payload()}, buffer)
    path.write_bytes(buffer.getvalue())
    # Execute / Assert
    with pytest.raises(CheckpointError, match="not a readable fedkd checkpoint"):
        store.inspect()
    assert not marker.exists()


def test_objects_cannot_be_checkpointed():
    assert encode({"a": np.arange(3), "b": [1.5, "x", None]})["b"] == [1.5, "x", None]
    with pytest.raises(TypeError, match="cannot checkpoint a Stop"):
        encode({"strategy": Stop()})


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "4", "it is for seed 3, not 4"),
    ("--strategy", "fedavg", "it is for strategies ['fedmd'], not ['fedavg']"),
    ("--rounds", "5", "scenario 'tiny' has changed since it was written"),
])
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, write_scenario, capsys, flag, value, message):
    # Prepare: a FedMD checkpoint of seed 3, 2 rounds, in the results folder.
    raw = two_strategies(rounds=2)
    raw["strategies"] = raw["strategies"][1:]
    store = _saved_checkpoint(tmp_path / "out", copy.deepcopy(raw))
    before = sorted(p.name for p in store.folder.iterdir())
    # Execute
    code = main(["simulate", str(write_scenario(raw)), "--out", str(tmp_path / "out"), "--resume", flag, value])
    # Assert: exit 2, one line naming the checkpoint and why; the checkpoint untouched.
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0] and str(store.folder) in err[0]
    assert sorted(p.name for p in store.folder.iterdir()) == before


def test_without_resume_an_old_checkpoint_is_overwritten_and_said_so(tmp_path, write_scenario, capsys):
    # Prepare: a checkpoint of a 2-round run, and a kill's leftover temporary file.
    raw = two_strategies(rounds=2)
    raw["strategies"] = raw["strategies"][1:]
    store = _saved_checkpoint(tmp_path / "out", copy.deepcopy(raw))
    (store.folder / ".1-fedmd.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    raw["rounds"] = 1
    # Execute
    code = main(["simulate", str(write_scenario(raw)), "--out", str(tmp_path / "out")])
    # Assert
    assert code == 0
    assert "holds a checkpoint of an earlier run; starting over" in capsys.readouterr().err
    assert not store.folder.exists()
    assert os.path.exists(tmp_path / "out" / "rounds.csv")


# -- the devices' state store: a stop at any moment of a round --------------------------

def fedmd_only(rounds: int = 3) -> dict:
    raw = two_strategies(rounds)
    raw["strategies"] = raw["strategies"][1:]
    raw["backend"] = {"state_cache_mb": 0.01}  # smaller than one model: the states live on disk
    return raw


@functools.cache
def _fedmd_uninterrupted() -> tuple[str, str]:
    return as_csv(run_scenario(parse_scenario(fedmd_only())))


def _stop_in_round_2(monkeypatch, moment: str) -> None:
    """Make the run stop in round 2 at ``moment`` (as a kill would: nothing after it runs)."""
    if moment == "mid-round, after a device's state was written":
        original = DeviceStateStore.put

        def put(self, device, state):
            original(self, device, state)
            if self.round == 2:
                raise Stop("put")

        monkeypatch.setattr(DeviceStateStore, "put", put)
    elif moment == "after the store committed round 2, before its checkpoint file":
        original_flush = DeviceStateStore.flush

        def flush(self, round_):
            original_flush(self, round_)
            if round_ == 2:
                raise Stop("flush")

        monkeypatch.setattr(DeviceStateStore, "flush", flush)
    else:  # after round 2's checkpoint file, before the versions it supersedes are dropped
        def checkpointed(self, round_, _original=DeviceStateStore.checkpointed):
            if round_ == 2:
                raise Stop("checkpointed")
            _original(self, round_)

        monkeypatch.setattr(DeviceStateStore, "checkpointed", checkpointed)


@pytest.mark.parametrize("moment", ["mid-round, after a device's state was written",
                                    "after the store committed round 2, before its checkpoint file",
                                    "after round 2's checkpoint file, before old versions are dropped"])
def test_a_stop_at_any_moment_of_a_round_resumes_with_each_devices_model_of_the_checkpoint(tmp_path, monkeypatch,
                                                                                        moment):
    # Prepare: FedMD for 3 rounds; some device trains in both rounds 1 and 2, so resuming after
    # a stop in round 2 needs its round-1 model back (the store keeps it until round 2's checkpoint).
    scenario = parse_scenario(fedmd_only())
    uninterrupted = _fedmd_uninterrupted()
    store = CheckpointStore(tmp_path, scenario)
    # Execute: stop in round 2 at that moment; then resume to the end.
    with monkeypatch.context() as patch:
        _stop_in_round_2(patch, moment)
        with pytest.raises(Stop):
            run_scenario(scenario, None, store)
    runs = run_scenario(scenario, None, store, resume=True)
    # Assert
    assert as_csv(runs) == uninterrupted
    rows = [line.split(",") for line in uninterrupted[1].splitlines()]
    header = rows[0]
    trained = {(int(r[header.index("round")]), int(r[header.index("device_id")])) for r in rows[1:]
               if r[header.index("phase")] == "train" and r[header.index("status")] == "ok"}
    assert {d for r, d in trained if r == 1} & {d for r, d in trained if r == 2}, "no device trained twice"
