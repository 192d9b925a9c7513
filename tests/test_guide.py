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
STRATEGY, ALLOCATOR = "server_step.py", "sparing_allocator.py"


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

    assert set(found) == {STRATEGY, ALLOCATOR}
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
