"""docs/writing-a-strategy.md works as printed: its examples are taken from the
guide's own text, written to files outside the repository, and run."""
from __future__ import annotations

import re
import shlex
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from fedkd.allocator import DevicePlan, plans_for
from fedkd.cli import build_parser, main
from fedkd.registry import resolve_allocator, resolve_strategy

from .conftest import REPO

GUIDE = REPO / "docs" / "writing-a-strategy.md"
STRATEGY, ALLOCATOR, CONSENSUS = "server_step.py", "sparing_allocator.py", "consensus_kd.py"


def examples() -> dict[str, str]:
    """The ```python blocks the guide marks with <!-- example: NAME -->, by NAME."""
    text = GUIDE.read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, re.DOTALL))


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.DOTALL)


@pytest.fixture
def elsewhere(tmp_path):
    """Write a guide example into a folder outside the repository; return its path."""

    def write(name: str):
        path = tmp_path / "my_work" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(examples()[name])
        return path

    return write


def test_the_guide_has_its_examples_and_they_match_docs_examples():
    found = examples()

    assert set(found) == {STRATEGY, ALLOCATOR, CONSENSUS}
    assert len(found[STRATEGY].splitlines()) < 40
    assert "https://arxiv.org/abs/" in found[STRATEGY].split('"""')[1]  # the module docstring cites
    for name, code in found.items():
        assert (REPO / "docs" / "examples" / name).read_text(encoding="utf-8") == code


def test_the_example_strategy_runs_from_a_file_outside_the_repo(elsewhere, write_scenario, tiny_scenario,
                                                               tmp_path):
    name = f"{elsewhere(STRATEGY)}:ServerStepFedAvg"
    out = tmp_path / "out"

    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out), "--strategy", name]) == 0

    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["strategy"].unique().tolist() == ["ServerStepFedAvg"]  # labelled by its class name
    assert rounds["round"].tolist() == [0, 1, 2]
    assert (rounds["participants"][1:] > 0).all()
    assert resolve_strategy(name).description == \
        "FedAvg whose global model moves server_lr of the way to the devices' average."


def test_the_example_strategy_steps_as_its_docstring_says(elsewhere, write_scenario, tiny_scenario, tmp_path):
    name = f"{elsewhere(STRATEGY)}:ServerStepFedAvg"
    tiny_scenario["strategies"] = ["fedavg", {"name": name, "label": "step_1", "params": {"server_lr": 1.0}},
                                   {"name": name, "label": "step_0", "params": {"server_lr": 0.0}}]
    out = tmp_path / "out"

    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)]) == 0

    rounds = pd.read_csv(out / "rounds.csv").set_index("strategy")
    # server_lr = 1 replaces the model by the average: FedAvg, to the bit.
    assert rounds.loc["step_1", "accuracy"].tolist() == rounds.loc["fedavg", "accuracy"].tolist()
    assert rounds.loc["step_1", "sim_time_s"].tolist() == rounds.loc["fedavg", "sim_time_s"].tolist()
    # server_lr = 0 never moves: every round scores the initial model.
    assert rounds.loc["step_0", "accuracy"].tolist() == [rounds.loc["fedavg", "accuracy"].iloc[0]] * 3


def test_the_guide_yaml_names_the_example_as_a_scenario_accepts_it(elsewhere, write_scenario, tiny_scenario,
                                                                   capsys):
    [snippet] = [b for b in blocks("yaml") if "ServerStepFedAvg" in b]
    strategies = yaml.safe_load(snippet)["strategies"]
    strategies[1]["name"] = strategies[1]["name"].replace("~/work/server_step.py", str(elsewhere(STRATEGY)))
    tiny_scenario["strategies"] = strategies

    assert main(["validate", str(write_scenario(tiny_scenario))]) == 0
    assert "server_step" in capsys.readouterr().out


def test_the_guide_commands_parse():
    commands = [line for block in blocks("sh") for line in block.splitlines() if line.startswith("fedkd ")]

    assert len(commands) >= 4
    for line in commands:
        build_parser().parse_args(shlex.split(line)[1:])  # exits on an unknown flag or subcommand


def test_the_example_allocator_plans_as_its_docstring_says(elsewhere):
    ref = resolve_allocator(f"{elsewhere(ALLOCATOR)}:SparingAllocator")
    telemetry = SimpleNamespace(
        battery_j=np.array([10.0, 500.0, np.inf, 80.0, 900.0]),
        uplink_bps=np.array([1e6, 5e4, 1e7, 1e6, 1e6]),
        compute_flops=np.array([1e9, 1e9, 5e7, 1e9, 1e9]),
    )

    plans = plans_for(ref.cls(), 3, [0, 1, 2, 3], telemetry)  # device 4 is not a candidate

    assert ref.description == "Low batteries sit out; slow uplinks send int8 logits; slow chips train one epoch."
    assert plans == {
        0: DevicePlan(take_part=False),  # 10 J < 50 J
        1: DevicePlan(codec="int8"),  # 5e4 bps < 1e5 bps
        2: DevicePlan(local_epochs=1),  # mains powered; 5e7 FLOP/s < 1e8
        3: DevicePlan(),  # 80 J >= 50 J
    }


def test_the_device_task_example_runs_beside_fedmd_and_compares(elsewhere, write_scenario, tiny_scenario, tmp_path):
    # Prepare: the guide's file outside the repository, run as the guide says, then compared.
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedkd.codecs import get_codec
    from fedkd.protocol import payload_bytes

    name = f"{elsewhere(CONSENSUS)}:ConsensusKD"
    scenario = write_scenario(tiny_scenario)
    mine, theirs = tmp_path / "consensus", tmp_path / "fedmd"

    assert main(["simulate", str(scenario), "--strategy", name, "--out", str(mine)]) == 0
    assert main(["simulate", str(scenario), "--strategy", "fedmd", "--out", str(theirs)]) == 0
    assert main(["compare", str(mine), str(theirs), "--out", str(tmp_path / "comparison")]) == 0

    # Each device's upload is its fp16 logits on the asked samples and its metrics, counted in full.
    rounds = pd.read_csv(mine / "rounds.csv")
    assert (rounds["participants"][1:] == 10).all()  # devices_per_round of the 12 devices
    devices = pd.read_csv(mine / "devices.csv")
    classes, public = 10, 128  # av_digits; the public split holds more than public_batch samples
    one = payload_bytes(RecordDict({
        "logits": ConfigRecord({"payload": get_codec("fp16").encode(np.zeros((public, classes), np.float32))}),
        "metrics": MetricRecord({"num-examples": 1})}))
    assert (devices.loc[devices["status"] == "ok", "bytes_up"] == one).all()
    assert (tmp_path / "comparison" / "accuracy_vs_bytes.png").stat().st_size > 0
    assert resolve_strategy(name).shares_weights is False


def test_two_strategies_claiming_one_device_task_are_refused_in_one_line(elsewhere, write_scenario, tiny_scenario,
                                                                        capsys):
    # Prepare: a second file that brings another function for the example's message type.
    path = elsewhere(CONSENSUS)
    rival = path.with_name("rival.py")
    rival.write_text(path.read_text().replace("device_tasks = {TASK: consensus_task}",
                                              "device_tasks = {TASK: lambda call: None}"))
    tiny_scenario["strategies"] = [f"{path}:ConsensusKD", f"{rival}:ConsensusKD"]

    assert main(["validate", str(write_scenario(tiny_scenario))]) == 2

    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "consensus_kd.py:ConsensusKD and " in err and "rival.py:ConsensusKD both claim device task 'train.consensus'" in err


@pytest.mark.parametrize("tasks, problem", [
    ('{"train.consensus": 42}', "is of type int, not a function"),
    ('{"train": consensus_task}', "'train' alone is fedkd's own task"),
    ('{"fit.consensus": consensus_task}', "category one of ['train', 'evaluate', 'query']"),
])
def test_a_malformed_device_task_is_refused_before_the_run(elsewhere, write_scenario, tiny_scenario, capsys,
                                                          tasks, problem):
    path = elsewhere(CONSENSUS)
    path.write_text(path.read_text().replace("device_tasks = {TASK: consensus_task}", f"device_tasks = {tasks}"))
    tiny_scenario["strategies"] = [f"{path}:ConsensusKD"]

    assert main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(path.parent / "out")]) == 2

    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and problem in err
    assert not (path.parent / "out").exists()
