"""docs/writing-a-dataset.md works as printed: its examples are taken from the guide's own
text, written to a folder outside the repository, and run there."""
from __future__ import annotations

import re
import runpy

import pandas as pd
import pytest
import yaml

from fedkd.cli import main
from fedkd.data import dataset_options
from fedkd.registry import builtin_strategies

from .conftest import REPO

GUIDE = REPO / "docs" / "writing-a-dataset.md"
EXAMPLES = {"make_watch_npz.py", "watch_windows.py", "watch.yaml", "watch_arrays.yaml", "watch_flower.yaml"}


def text() -> str:
    return GUIDE.read_text(encoding="utf-8")


def examples() -> dict[str, str]:
    """The code blocks the guide marks with <!-- example: NAME -->, by NAME."""
    return dict(re.findall(r"<!-- example: (\S+) -->\n```\w+\n(.*?)```", text(), re.DOTALL))


@pytest.fixture
def my_work(tmp_path, monkeypatch):
    """A folder outside the repository holding the guide's files and watch.npz; the current folder."""
    folder = tmp_path / "my_work"
    folder.mkdir()
    for name, code in examples().items():
        (folder / name).write_text(code)
    monkeypatch.chdir(folder)
    runpy.run_path(str(folder / "make_watch_npz.py"), run_name="__main__")
    return folder


def simulate(scenario: str, out: str, *extra: str) -> pd.DataFrame:
    assert main(["simulate", scenario, "--out", out, *extra]) == 0
    return pd.read_csv(f"{out}/rounds.csv")


def test_the_guide_has_its_examples():
    found = examples()

    assert set(found) == EXAMPLES
    assert len(found["watch_windows.py"].splitlines()) < 40  # one short file


def test_the_file_dataset_runs_every_built_in_strategy(my_work):
    # The guide's dataset file as printed; the scenario made smaller, so that 16 strategies take seconds each.
    scenario = yaml.safe_load((my_work / "watch.yaml").read_text())
    scenario["population"]["devices"] = 6
    scenario["data"]["test_samples"] = 40
    (my_work / "small.yaml").write_text(yaml.safe_dump(scenario))
    builtins = list(builtin_strategies())
    args = [a for name in builtins for a in ("--strategy", name)]

    rounds = simulate("small.yaml", "out", "--rounds", "1", *args)

    assert rounds["strategy"].unique().tolist() == builtins
    first = rounds[rounds["round"] == 1]
    assert len(first) == len(builtins) and first["accuracy"].between(0, 1).all()


def test_the_arrays_scenario_runs_the_same_npz_without_code(my_work, capsys):
    assert main(["validate", "watch_arrays.yaml"]) == 0
    assert "data arrays: accel series (3, 64), gyro series (3, 64); 4 classes;" in capsys.readouterr().out

    rounds = simulate("watch_arrays.yaml", "out", "--rounds", "1")

    assert rounds["round"].tolist() == [0, 1] and rounds["participants"].iloc[1] > 0


def test_the_flower_partitioner_scenario_runs(my_work):
    rounds = simulate("watch_flower.yaml", "out")

    assert rounds["round"].tolist() == [0, 1, 2]


def test_the_error_the_guide_shows_is_the_one_fedkd_prints(my_work, capsys):
    source = (my_work / "watch_windows.py").read_text()
    broken = source.replace('"gyro": gyro[i].astype(np.float32)', '"gyro": gyro[i][:, :, :50].astype(np.float32)')
    assert broken != source
    (my_work / "watch_windows.py").write_text(broken)
    shown = re.search(r"```text\n(fedkd: error: .*?)\n```", text(), re.DOTALL).group(1)

    assert main(["validate", "watch.yaml"]) == 2
    assert capsys.readouterr().err.strip() == shown


def test_the_options_table_lists_exactly_the_options_of_arrays():
    table = text().split("The options of `arrays`")[1].split("\n\n")[1]
    listed = {name for row in table.splitlines()[2:] for name in re.findall(r"`(\w+)`", row.split("|")[1])}

    assert listed == set(dataset_options("arrays"))
