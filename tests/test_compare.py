"""``fedkd compare``: several run folders into one table and one set of plots."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from fedkd.cli import main
from fedkd.report import PLOTS

from .conftest import TINY

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real runs of different scenarios: tiny (fedavg) and tiny_other (fedavg, fedprox)."""
    root = tmp_path_factory.mktemp("runs")
    import yaml

    other = copy.deepcopy(TINY) | {"name": "tiny_other", "seed": 4}
    for scenario, extra in ((TINY, ["--strategy", "fedavg"]), (other, [])):
        path = root / f"{scenario['name']}.yaml"
        path.write_text(yaml.safe_dump(scenario, sort_keys=False))
        assert main(["simulate", str(path), "--out", str(root / scenario["name"]), *extra]) == 0
    return root / "tiny", root / "tiny_other"


def test_two_runs_give_one_table_and_one_figure_per_axis(two_runs, tmp_path, capsys):
    tiny, other = two_runs
    out = tmp_path / "cmp"
    capsys.readouterr()

    assert main(["compare", str(tiny), str(other), "--out", str(out)]) == 0

    table = pd.read_csv(out / "comparison.csv")
    a, b = pd.read_csv(tiny / "rounds.csv"), pd.read_csv(other / "rounds.csv")
    assert len(table) == len(a) + len(b)
    assert list(table.columns[:6]) == ["label", "scenario", "source", "strategy", "seed", "round"]
    assert set(table["seed"]) == {3, 4}  # tiny is seed 3, tiny_other seed 4
    assert table["label"].unique().tolist() == ["tiny/fedavg", "tiny_other/fedavg", "tiny_other/fedprox"]
    mine = table[table["label"] == "tiny_other/fedprox"]
    theirs = b[b["strategy"] == "fedprox"]
    assert mine["accuracy"].tolist() == theirs["accuracy"].tolist()
    assert mine["cum_bytes"].tolist() == theirs["cum_bytes"].tolist()
    assert set(mine["source"]) == {str(other)} and set(mine["scenario"]) == {"tiny_other"}
    for plot in PLOTS:
        assert (out / plot).read_bytes()[:4] == PNG
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in printed[:3]] == table["label"].unique().tolist()
    assert printed[-1].startswith(f"comparison in {out}/ (comparison.csv, ")


def test_the_table_is_the_same_bytes_every_time(two_runs, tmp_path):
    for name in ("x", "y"):
        assert main(["compare", *map(str, two_runs), "--out", str(tmp_path / name)]) == 0

    assert (tmp_path / "x" / "comparison.csv").read_bytes() == (tmp_path / "y" / "comparison.csv").read_bytes()


# -- labels, on hand-made run folders ---------------------------------------------------

def make_run(folder, scenario: str | None, strategies: list[str], extra: dict | None = None,
             seeds: list[int] | None = None, summary_seed: int | None = None):
    """A run folder with two rounds per strategy; summary.json only if ``scenario`` is given.

    Without ``seeds`` rounds.csv has no seed column (as written before it existed); with
    them, a seed's accuracy and clock are those of seed 0 plus 0.2 and 10 s per seed.
    """
    rows = [{"strategy": s, **({"seed": seed} if seeds is not None else {}), "round": r,
             "sim_time_s": 10.0 * r + 10.0 * seed * r, "accuracy": 0.1 + 0.2 * r + 0.2 * seed * r,
             "cum_bytes": 1000 * r, "cum_energy_j": 1.5 * r, **(extra or {})}
            for s in strategies for seed in (seeds if seeds is not None else [0]) for r in (0, 1)]
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "rounds.csv", index=False)
    if scenario:
        summary = {"scenario": scenario, **({"seed": summary_seed} if summary_seed is not None else {})}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def compare(*folders, out) -> pd.DataFrame:
    assert main(["compare", *map(str, folders), "--out", str(out)]) == 0
    return pd.read_csv(Path(out) / "comparison.csv")


def labels(table: pd.DataFrame) -> list[str]:
    return table["label"].unique().tolist()


def test_one_scenario_with_distinct_strategies_keeps_the_strategy_names(tmp_path):
    a = make_run(tmp_path / "a", "park", ["fedavg"])
    b = make_run(tmp_path / "b", "park", ["fedprox", "mine"])

    assert labels(compare(a, b, out=tmp_path / "o")) == ["fedavg", "fedprox", "mine"]


def test_one_scenario_run_twice_is_told_apart_by_folder(tmp_path):
    a = make_run(tmp_path / "seed0", "park", ["fedavg"])
    b = make_run(tmp_path / "seed1", "park", ["fedavg"])

    assert labels(compare(a, b, out=tmp_path / "o")) == ["seed0/fedavg", "seed1/fedavg"]


def test_different_scenarios_are_told_apart_by_scenario(tmp_path):
    a = make_run(tmp_path / "a", "park", ["fedavg"])
    b = make_run(tmp_path / "b", "digits", ["fedavg"])

    assert labels(compare(a, b, out=tmp_path / "o")) == ["park/fedavg", "digits/fedavg"]


def test_a_clash_within_one_scenario_falls_back_to_folders_for_all(tmp_path):
    a = make_run(tmp_path / "a", "park", ["fedavg"])
    b = make_run(tmp_path / "b", "park", ["fedavg"])
    c = make_run(tmp_path / "c", "digits", ["fedavg"])

    assert labels(compare(a, b, c, out=tmp_path / "o")) == ["a/fedavg", "b/fedavg", "c/fedavg"]


def test_folders_of_one_name_fall_back_to_the_path_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "x" / "run", "park", ["fedavg"])
    make_run(tmp_path / "y" / "run", "park", ["fedavg"])

    assert labels(compare("x/run", "y/run", out="o")) == ["x/run/fedavg", "y/run/fedavg"]


def test_without_summary_the_folder_names_the_scenario(tmp_path):
    a = make_run(tmp_path / "old_run", None, ["fedavg"])
    b = make_run(tmp_path / "b", "park", ["fedavg"])

    table = compare(a, b, out=tmp_path / "o")

    assert labels(table) == ["old_run/fedavg", "park/fedavg"]


def test_columns_only_some_runs_have_are_empty_for_the_others(tmp_path):
    a = make_run(tmp_path / "a", "park", ["fedavg"], {"accuracy_camera": 0.5})
    b = make_run(tmp_path / "b", "digits", ["fedavg"], {"accuracy_audio": 0.25})

    table = compare(a, b, out=tmp_path / "o")

    assert table["accuracy_camera"].fillna(-1).tolist() == [0.5, 0.5, -1, -1]
    assert table["accuracy_audio"].fillna(-1).tolist() == [-1, -1, 0.25, 0.25]


# -- several seeds ------------------------------------------------------------------------

def test_runs_with_several_seeds_keep_a_row_per_seed_and_plot_means_with_bands(tmp_path, capsys, monkeypatch):
    # Prepare: a two-seed run, and an older one-seed folder without a seed column.
    import matplotlib.axes

    bands = []
    real_fill = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lo, hi, **kw: bands.append(list(x)) or real_fill(self, x, lo, hi, **kw))
    many = make_run(tmp_path / "many", "park", ["fedavg"], seeds=[0, 1])
    old = make_run(tmp_path / "old", "digits", ["fedavg"], summary_seed=7)
    capsys.readouterr()
    # Execute
    table = compare(many, old, out=tmp_path / "o")
    # Assert: one row per (run, strategy, seed, round); the old folder is its summary's one seed.
    assert list(zip(table["label"], table["seed"], table["round"])) == [
        ("park/fedavg", 0, 0), ("park/fedavg", 0, 1), ("park/fedavg", 1, 0), ("park/fedavg", 1, 1),
        ("digits/fedavg", 7, 0), ("digits/fedavg", 7, 1)]
    # One band per plot, for the two-seed curve: at round 1 x is the mean clock (10 + 20) / 2.
    assert bands == [[0.0, 15.0], [0.0, 1000.0], [0.0, 1.5]]
    printed = capsys.readouterr().out.splitlines()
    # Final accuracies 0.3 and 0.5: mean 0.4, half-width 12.706205 * 0.141421 / sqrt(2) = 1.271.
    assert printed[0].strip() == ("park/fedavg: accuracy 0.400 ± 1.271 after 1 rounds, 15 s simulated, 1,000 bytes, "
                                  "1.5 J (means over 2 seeds; accuracy ± 95 % CI)")
    assert printed[1].strip().startswith("digits/fedavg: accuracy 0.300 after 1 rounds")


def test_an_old_folder_without_summary_has_an_empty_seed(tmp_path):
    a = make_run(tmp_path / "a", None, ["fedavg"])
    b = make_run(tmp_path / "b", "park", ["fedprox"], seeds=[2])

    table = compare(a, b, out=tmp_path / "o")

    assert table["seed"].isna().tolist() == [True, True, False, False]
    assert (tmp_path / "o" / "comparison.csv").read_text().splitlines()[1].split(",")[4] == ""


# -- errors: one line, exit 2, nothing written -----------------------------------------

@pytest.mark.parametrize("case, message", [
    ("no_rounds_csv", "has no rounds.csv; expected a run folder written by `fedkd simulate`"),
    ("not_a_folder", "is not a folder"),
    ("missing_columns", "lacks columns ['cum_bytes', 'cum_energy_j']"),
    ("empty_rounds", "has no rounds"),
    ("bad_summary", "summary.json is not valid JSON"),
    ("given_twice", "is given twice"),
    ("out_is_a_run", "is one of the run folders; its plots would be overwritten"),
    ("out_is_a_file", "exists and is not a folder"),
])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(case, message, tmp_path, capsys):
    good = make_run(tmp_path / "good", "park", ["fedavg"])
    bad = tmp_path / "bad"
    out = tmp_path / "out"
    if case == "no_rounds_csv":
        bad.mkdir()
    elif case == "missing_columns":
        bad.mkdir()
        pd.DataFrame({"strategy": ["a"], "round": [0], "sim_time_s": [0.0], "accuracy": [0.1]}).to_csv(
            bad / "rounds.csv", index=False)
    elif case == "empty_rounds":
        make_run(bad, "park", [])
        (bad / "rounds.csv").write_text("strategy,round,sim_time_s,accuracy,cum_bytes,cum_energy_j\n")
    elif case == "bad_summary":
        make_run(bad, "park", ["fedprox"])
        (bad / "summary.json").write_text("{not json")
    elif case == "given_twice":
        bad = good
    elif case == "out_is_a_run":
        make_run(bad, "park", ["fedprox"])
        out = bad
    elif case == "out_is_a_file":
        make_run(bad, "park", ["fedprox"])
        out.write_text("")
    before = sorted(p.name for p in tmp_path.rglob("*"))

    code = main(["compare", str(good), str(bad), "--out", str(out)])

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
