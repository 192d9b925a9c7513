"""Finding strategies (and allocators) by name, file, module and entry point,
and the one-line errors a user meets when a name does not lead to one."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pandas as pd
import pytest

from fedkd.cli import main
from fedkd.errors import FedkdError
from fedkd.registry import (StrategyRef, check_params, registered_strategies, resolve_allocator, resolve_strategy,
                            strategy_params)

from .conftest import REPO

GOOD = '''\
"""Module line: a FedAvg for tests.

Someone et al., a paper, https://arxiv.org/abs/0000.00000
"""
from flwr.serverapp.strategy import FedAvg


class Mine(FedAvg):
    """Class line: FedAvg with a knob."""

    def __init__(self, knob: float = 1.0, **fedavg_args):
        super().__init__(**fedavg_args)
        self.knob = knob
'''


@pytest.fixture
def write_py(tmp_path):
    """Write Python source to a file under tmp_path and return its path."""

    def write(source: str, name: str = "mine.py"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return write


# -- what resolves ---------------------------------------------------------------------

def test_builtin_name_resolves_with_its_module_description():
    ref = resolve_strategy("fedavg")
    assert ref.cls.__name__ == "FedAvg" and ref.shares_weights is True
    assert ref.description.startswith("FedAvg: average the devices' weights")


def test_module_colon_class_resolves():
    from flwr.serverapp.strategy import FedProx

    assert resolve_strategy("flwr.serverapp.strategy:FedProx").cls is FedProx


def test_file_colon_class_resolves_even_in_a_folder_with_a_colon(write_py):
    path = write_py(GOOD, "odd:folder/mine.py")

    ref = resolve_strategy(f"{path}:Mine")

    assert ref.cls.__name__ == "Mine" and ref.description == "Class line: FedAvg with a knob."


def test_home_folder_in_a_path_is_expanded(write_py, tmp_path, monkeypatch):
    write_py(GOOD)
    monkeypatch.setenv("HOME", str(tmp_path))

    assert resolve_strategy("~/mine.py:Mine").cls.__name__ == "Mine"


def test_description_falls_back_to_the_module_then_to_a_placeholder(write_py):
    inherited = write_py(GOOD.replace('    """Class line: FedAvg with a knob."""\n', ""), "inherited.py")
    bare = write_py("from flwr.serverapp.strategy import FedAvg\nclass Bare(FedAvg):\n    pass\n", "bare.py")

    # An undocumented subclass does not borrow Flower's FedAvg docstring.
    assert resolve_strategy(f"{inherited}:Mine").description == "Module line: a FedAvg for tests."
    assert resolve_strategy(f"{bare}:Bare").description == "(no description)"


def test_shares_weights_comes_from_the_module_flag_then_the_class(write_py):
    flagged = write_py(GOOD + "SHARES_WEIGHTS = False\n", "flagged.py")
    by_class = write_py(GOOD + "Mine.shares_weights = False\n", "by_class.py")
    wrong = write_py(GOOD + "SHARES_WEIGHTS = 'no'\n", "wrong.py")

    assert resolve_strategy(f"{flagged}:Mine").shares_weights is False
    assert resolve_strategy(f"{by_class}:Mine").shares_weights is False
    assert resolve_strategy(f"{write_py(GOOD)}:Mine").shares_weights is True
    with pytest.raises(FedkdError, match="SHARES_WEIGHTS must be True or False, got 'no'"):
        resolve_strategy(f"{wrong}:Mine")


def test_params_are_followed_through_kwargs_to_the_parent(write_py):
    ref = resolve_strategy(f"{write_py(GOOD)}:Mine")
    defaults = {"fraction_train": 0.5, "proximal_mu": 0.1}  # the second is FedProx's, not FedAvg's

    params = strategy_params(ref, defaults, {"knob": 2.0})

    assert params == {"fraction_train": 0.5, "knob": 2.0}
    assert check_params(ref, params) is None
    problem = check_params(ref, {"knbo": 2.0})
    assert "['knbo']" in problem and "'knob'" in problem and "'fraction_train'" in problem


def test_kwargs_that_no_parent_takes_by_name_mean_anything_goes():
    class Open:  # its **kwargs cannot go on to object(), so it takes them itself
        def __init__(self, size: int = 1, **options):
            self.options = options

    class Closed:
        def __init__(self, size: int = 1):
            pass

    defaults = {"size": 2, "colour": "red"}

    assert strategy_params(StrategyRef("open", Open, "", True), defaults, {}) == defaults
    assert strategy_params(StrategyRef("closed", Closed, "", True), defaults, {}) == {"size": 2}
    assert "unexpected keyword argument 'colour'" in check_params(StrategyRef("closed", Closed, "", True),
                                                                  {"colour": "red"})


# -- what does not, through the command line and through the scenario ------------------

BROKEN = {
    "module_missing": (None, "no_such_module_xyz:Thing",
                       "strategy module 'no_such_module_xyz' not found"),
    "file_missing": (None, "{dir}/absent.py:Thing", "absent.py not found"),
    "class_missing": (GOOD, "{file}:Mien", "has no strategy class 'Mien'; it defines ['Mine']"),
    "no_class_named": (GOOD, "{file}", "names a file but no class; write"),
    "nothing_after_colon": (GOOD, "{file}:", "is incomplete"),
    "not_a_strategy": ("class Helper:\n    pass\n", "{file}:Helper", ":Helper is not a Flower strategy"),
    "not_a_class": ("def make():\n    pass\n", "{file}:make", ":make is a function, not a class"),
    "abstract": ("from flwr.serverapp.strategy import Strategy\nclass Half(Strategy):\n"
                 "    def summary(self):\n        pass\n", "{file}:Half",
                 "is abstract: it does not implement aggregate_evaluate, aggregate_train, configure_evaluate"),
    "raises_on_import": ("raise RuntimeError('boom\\non two lines')\n", "{file}:Mine",
                         "failed to import: RuntimeError: boom on two lines"),
    "syntax_error": ("class (:\n", "{file}:Mine", "failed to import: SyntaxError"),
    "exits_on_import": ("import sys\nsys.exit(3)\n", "{file}:Mine", "failed to import: SystemExit: 3"),
    "folder_not_py": (None, "{dir}/pkg/mod:Thing", "must be a Python file ending in .py"),
}


def _broken_name(case: str, write_py, tmp_path) -> str:
    source, template, _ = BROKEN[case]
    file = write_py(source) if source is not None else tmp_path / "mine.py"
    return template.format(file=file, dir=tmp_path)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_strategy_on_the_command_line_is_one_line_exit_2(case, write_py, write_scenario, tiny_scenario,
                                                                tmp_path, capsys):
    name, out = _broken_name(case, write_py, tmp_path), tmp_path / "out"

    code = main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out), "--strategy", name])

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert BROKEN[case][2] in err
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_strategy_in_the_scenario_is_one_line_exit_2(case, write_py, write_scenario, tiny_scenario,
                                                            tmp_path, capsys):
    tiny_scenario["strategies"] = ["fedavg", _broken_name(case, write_py, tmp_path)]
    out = tmp_path / "out"

    code = main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "strategies[1].name: " in err and BROKEN[case][2] in err
    assert not out.exists()


def test_a_missing_dependency_is_not_reported_as_a_missing_module(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(FedkdError, match="'needs_dep' failed to import: ModuleNotFoundError: "
                                         "No module named 'no_such_dependency_xyz'"):
        resolve_strategy("needs_dep:Thing")
    sys.modules.pop("needs_dep", None)


def test_a_param_the_strategy_does_not_take_is_caught_before_the_run(write_py, write_scenario, tiny_scenario,
                                                                     tmp_path, capsys):
    tiny_scenario["strategies"] = [{"name": f"{write_py(GOOD)}:Mine", "params": {"knbo": 2.0}}]

    code = main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 2 and "strategies[0].params" in err and "['knbo']" in err


def test_a_broken_file_exits_2_without_a_traceback_in_a_real_process(write_py, write_scenario, tiny_scenario,
                                                                     tmp_path):
    path = write_py("import numpy\nraise ValueError('the author forgot something')\n")

    proc = subprocess.run([sys.executable, "-m", "fedkd", "simulate", str(write_scenario(tiny_scenario)),
                           "--strategy", f"{path}:Mine", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)

    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("fedkd: error: ") and line.endswith(
        f"strategies[0].name: strategy file {path} failed to import: ValueError: the author forgot something")


RAISES_IN_ROUND_2 = '''\
from flwr.serverapp.strategy import FedAvg


class Flaky(FedAvg):
    def aggregate_train(self, server_round, replies):
        if server_round == 2:
            raise ValueError("no good in round 2")
        return super().aggregate_train(server_round, replies)
'''


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_strategy_that_raises_mid_run_is_one_line_naming_the_run_and_its_line(jobs, write_py, write_scenario,
                                                                               tiny_scenario, tmp_path, capsys):
    # Prepare: FedAvg, then a plug-in that fails in its second round; one by one, or in worker processes.
    path = write_py(RAISES_IN_ROUND_2, "flaky.py")
    tiny_scenario["strategies"] = ["fedavg", f"{path}:Flaky"]
    scenario, out = write_scenario(tiny_scenario), tmp_path / "out"
    # Execute
    code = main(["simulate", str(scenario), "--out", str(out), "--jobs", jobs])
    # Assert: exit 2; one line with the run, the exception and the plug-in's own line (not Flower's).
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"run {path}:Flaky seed 3 failed: ValueError: no good in round 2 (at {path}:7, in aggregate_train)" in err
    # FedAvg's finished run is checkpointed: with the plug-in fixed, --resume runs only the other.
    path.write_text(RAISES_IN_ROUND_2.replace("server_round == 2", "server_round == -1"))
    assert main(["simulate", str(scenario), "--out", str(out), "--jobs", jobs, "--resume"]) == 0
    assert f"fedavg done, {path}:Flaky after round 1" in capsys.readouterr().err


def test_with_v_the_traceback_comes_before_the_line(write_py, write_scenario, tiny_scenario, tmp_path, capsys):
    tiny_scenario["strategies"] = [f"{write_py(RAISES_IN_ROUND_2, 'flaky.py')}:Flaky"]

    code = main(["-v", "simulate", str(write_scenario(tiny_scenario)), "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("fedkd: error: run ")


SENDS_WEIGHTS_NO_DEVICE_CAN_LOAD = '''\
import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg


class Garbled(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content["arrays"] = ArrayRecord({"bogus": Array(np.zeros(3, "float32"))})
        return messages
'''


def test_device_tasks_that_raise_are_failures_and_said_once_on_stderr(write_py, write_scenario, tiny_scenario,
                                                                      tmp_path, capsys):
    # Prepare: every device task of this plug-in raises (weights of no architecture).
    import json

    tiny_scenario["strategies"] = [f"{write_py(SENDS_WEIGHTS_NO_DEVICE_CAN_LOAD, 'garbled.py')}:Garbled"]
    out = tmp_path / "out"
    # Execute
    code = main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out)])
    # Assert: the run completes (a device that raises is a failed device, as in Flower), and
    # one warning says how many tasks raised and what the first said, which summary.json keeps.
    assert code == 0
    devices = pd.read_csv(out / "devices.csv")
    failed = int((devices["reason"] == "error").sum())
    assert failed == len(devices) > 0
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert f"{failed} of {failed} device tasks raised or replied invalid" in warning
    assert "the first: round 1, device " in warning and "Unexpected key(s) in state_dict: \"bogus\"" in warning
    [entry] = json.loads((out / "summary.json").read_text())["strategies"].values()
    assert entry["first_device_task_error"].startswith("seed 3, round 1, device ")
    assert entry["failures"] == {"error": failed}


# -- entry points of installed packages ------------------------------------------------

PLUGIN = '''\
"""A plugin package's strategies and allocators."""
from flwr.serverapp.strategy import FedAvg

from fedkd.allocator import AllIn


class DemoAvg(FedAvg):
    """FedAvg, shipped by a plugin."""


class DemoAllocator(AllIn):
    """Everyone in, shipped by a plugin."""
'''


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """Make a package 'installed': a module and its *.dist-info with entry_points.txt on sys.path.

    That is what pip leaves in site-packages, and how importlib.metadata finds
    entry points, so the lookup under test is the real one.
    """
    modules = []

    def install(dist: str, module: str, entry_points: str, source: str = PLUGIN):
        site = tmp_path / f"site_{dist}"
        info = site / f"{dist}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        (site / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(site))
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


DEMO_ENTRY_POINTS = """\
    [fedkd.strategies]
    demo_avg = fedkd_demo_plugin:DemoAvg
    fedavg = fedkd_demo_plugin:DemoAvg

    [fedkd.allocators]
    demo_alloc = fedkd_demo_plugin:DemoAllocator
"""


def test_entry_point_strategy_and_allocator_resolve_by_name(install_plugin):
    install_plugin("fedkd-demo-plugin", "fedkd_demo_plugin", DEMO_ENTRY_POINTS)

    strategy, allocator = resolve_strategy("demo_avg"), resolve_allocator("demo_alloc")

    assert strategy.cls.__name__ == "DemoAvg" and strategy.description == "FedAvg, shipped by a plugin."
    assert allocator.cls.__name__ == "DemoAllocator"
    # A built-in keeps its name; the plugin's claim on "fedavg" is ignored.
    assert resolve_strategy("fedavg").cls.__module__.startswith("flwr.")
    assert list(registered_strategies())[-1] == "demo_avg"


def test_entry_point_strategy_runs_from_the_command_line_and_the_scenario(install_plugin, write_scenario,
                                                                          tiny_scenario, tmp_path):
    install_plugin("fedkd-demo-plugin", "fedkd_demo_plugin", DEMO_ENTRY_POINTS)
    tiny_scenario["rounds"] = 1
    tiny_scenario["strategies"] = ["demo_avg"]
    path = write_scenario(tiny_scenario)

    from_yaml = main(["simulate", str(path), "--out", str(tmp_path / "yaml")])
    from_cli = main(["simulate", str(path), "--out", str(tmp_path / "cli"), "--strategy", "demo_avg",
                     "--strategy", "fedavg"])

    assert from_yaml == 0 and from_cli == 0
    assert pd.read_csv(tmp_path / "yaml" / "rounds.csv")["strategy"].unique().tolist() == ["demo_avg"]
    assert pd.read_csv(tmp_path / "cli" / "rounds.csv")["strategy"].unique().tolist() == ["demo_avg", "fedavg"]


def test_unknown_name_lists_installed_plugins(install_plugin, write_scenario, tiny_scenario, capsys):
    install_plugin("fedkd-demo-plugin", "fedkd_demo_plugin", DEMO_ENTRY_POINTS)

    assert main(["simulate", str(write_scenario(tiny_scenario)), "--strategy", "demo_avgg"]) == 2

    err = capsys.readouterr().err
    assert "unknown strategy 'demo_avgg'; expected one of [" in err and "'demo_avg'" in err
