"""The command line as a user meets it: exit codes, files, determinism."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from fedkd.cli import main

from .conftest import REPO


def test_strategies_lists_the_builtins(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "fedprox" in out and "arxiv" not in out.lower()


def test_validate_ok(write_scenario, tiny_scenario, capsys):
    assert main(["validate", str(write_scenario(tiny_scenario))]) == 0
    assert ": ok" in capsys.readouterr().out


def test_bad_scenario_exits_2_with_one_line_and_writes_nothing(write_scenario, tiny_scenario, tmp_path):
    tiny_scenario["world"]["round_deadline_s"] = -5
    path = write_scenario(tiny_scenario)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fedkd", "simulate", str(path), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "world.round_deadline_s" in lines[0] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_strategy_on_the_command_line_exits_2(write_scenario, tiny_scenario, capsys):
    assert main(["simulate", str(write_scenario(tiny_scenario)), "--strategy", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


def run_tiny(path, out, *extra):
    assert main(["simulate", str(path), "--out", str(out), *extra]) == 0
    return pd.read_csv(out / "rounds.csv")


def test_simulate_writes_the_results_contract(write_scenario, tiny_scenario, tmp_path):
    out = tmp_path / "run"
    rounds = run_tiny(write_scenario(tiny_scenario), out)
    assert list(rounds.columns[:10]) == ["strategy", "seed", "round", "sim_time_s", "accuracy", "bytes_up",
                                         "bytes_down", "energy_j", "participants", "dropped"]
    assert set(rounds["seed"]) == {3}
    # No backhaul or device-to-device links here: every byte is a device's up- or downlink.
    assert (rounds["total_bytes"] == rounds["bytes_up"] + rounds["bytes_down"]).all()
    assert (rounds.groupby("strategy")["total_bytes"].cumsum() == rounds["cum_total_bytes"]).all()
    assert sorted(rounds["strategy"].unique()) == ["fedavg", "fedprox"]
    assert rounds.groupby("strategy")["round"].max().tolist() == [2, 2]
    assert (rounds.groupby("strategy")["sim_time_s"].diff().dropna() >= 0).all()
    devices = pd.read_csv(out / "devices.csv")
    assert set(devices["status"]) <= {"ok", "failed"} and len(devices) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and set(summary["strategies"]) == {"fedavg", "fedprox"}
    assert summary["seeds"] == [3] and summary["baseline"]["strategy"] == "fedavg"
    fedprox = summary["strategies"]["fedprox"]
    assert fedprox["total_bytes"] == int(rounds[rounds["strategy"] == "fedprox"]["cum_total_bytes"].iloc[-1])
    assert fedprox["stats"]["final_accuracy"]["per_seed"] == {"3": fedprox["final_accuracy"]}
    assert fedprox["vs_baseline"]["final_accuracy"]["n"] == 1
    assert summary["versions"]["flwr"].startswith("1.41")
    for plot in ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "accuracy_vs_energy.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    checker = REPO.parent / "shared" / "tools" / "check-results"
    if checker.exists():
        proc = subprocess.run([sys.executable, str(checker), str(out)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_same_seed_gives_byte_identical_rounds_csv(write_scenario, tiny_scenario, tmp_path):
    path = write_scenario(tiny_scenario)
    run_tiny(path, tmp_path / "a", "--strategy", "fedavg")
    run_tiny(path, tmp_path / "b", "--strategy", "fedavg")
    assert (tmp_path / "a" / "rounds.csv").read_bytes() == (tmp_path / "b" / "rounds.csv").read_bytes()
    run_tiny(path, tmp_path / "c", "--strategy", "fedavg", "--seed", "4")
    assert (tmp_path / "a" / "rounds.csv").read_bytes() != (tmp_path / "c" / "rounds.csv").read_bytes()


def test_strategy_and_rounds_overrides(write_scenario, tiny_scenario, tmp_path):
    rounds = run_tiny(write_scenario(tiny_scenario), tmp_path / "o", "--strategy", "fedprox", "--rounds", "1")
    assert rounds["strategy"].unique().tolist() == ["fedprox"] and rounds["round"].max() == 1


@pytest.mark.ray
def test_ray_backend_gives_the_inprocess_accuracy_curve(write_scenario, tiny_scenario, tmp_path):
    path = write_scenario(tiny_scenario)
    local = run_tiny(path, tmp_path / "local", "--strategy", "fedavg")
    ray = run_tiny(path, tmp_path / "ray", "--strategy", "fedavg", "--backend", "ray")
    assert ray["accuracy"].tolist() == pytest.approx(local["accuracy"].tolist(), abs=1e-6)
    assert ray["sim_time_s"].tolist() == pytest.approx(local["sim_time_s"].tolist(), rel=1e-9)


def test_strategy_override_picks_entries_by_label_then_name(write_scenario, tiny_scenario):
    from fedkd.runner import with_overrides
    from fedkd.scenario import Scenario

    tiny_scenario["strategies"] = [{"name": "fedprox", "params": {"proximal_mu": 0.1}},
                                   {"name": "fedprox", "label": "strong", "params": {"proximal_mu": 1.0}}]
    scenario, path = Scenario.model_validate(tiny_scenario), str(write_scenario(tiny_scenario))
    # The bare name is the entry it labels (the unlabelled one), not the first of that name.
    [plain] = with_overrides(scenario, path, strategies=["fedprox"]).strategies
    assert plain.params == {"proximal_mu": 0.1}
    both = with_overrides(scenario, path, strategies=["strong", "fedprox"]).strategies
    assert [(s.run_label, s.params["proximal_mu"]) for s in both] == [("strong", 1.0), ("fedprox", 0.1)]


# -- several seeds -------------------------------------------------------------------

@pytest.mark.parametrize("seeds", ["0-", "b", "3-1", "1,1", "0-2,2"])
def test_malformed_seeds_are_one_line_exit_2_and_write_nothing(write_scenario, tiny_scenario, tmp_path, capsys,
                                                                 seeds):
    out = tmp_path / "out"

    code = main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out), "--seeds", seeds])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"fedkd: error: --seeds {seeds}: expected"), err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--seed", "1", "--seeds", "0-2"], "--seed and --seeds: expected one of them"),
    (["--baseline", "nope"], "--baseline nope: expected one of the run's strategies ['fedavg', 'fedprox']"),
    (["--strategy", "fedavg", "--baseline", "fedprox"], "--baseline fedprox: expected one of"),
])
def test_conflicting_or_unknown_options_are_one_line_exit_2(write_scenario, tiny_scenario, tmp_path, capsys,
                                                            extra, message):
    out = tmp_path / "out"

    code = main(["simulate", str(write_scenario(tiny_scenario)), "--out", str(out), *extra])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("seeds, message", [
    ([], "seeds: expected at least one seed"), ([1, 1], "seeds: expected distinct seeds; [1]"),
    ([-1], "seeds[0]: Input should be greater than or equal to 0"),
])
def test_a_scenario_seeds_list_is_validated(write_scenario, tiny_scenario, capsys, seeds, message):
    tiny_scenario["seeds"] = seeds

    assert main(["validate", str(write_scenario(tiny_scenario))]) == 2
    assert message in capsys.readouterr().err


def test_several_seeds_run_each_seed_as_its_own_scenario(write_scenario, tiny_scenario, tmp_path, capsys):
    # Prepare: the tiny scenario lists two seeds; --seeds replaces them, --seed runs one.
    tiny_scenario["seeds"] = [5, 6]
    path = write_scenario(tiny_scenario)
    capsys.readouterr()
    # Execute
    rounds = run_tiny(path, tmp_path / "many", "--rounds", "1", "--seeds", "4,3")
    printed = capsys.readouterr().out.splitlines()
    one = run_tiny(path, tmp_path / "one", "--rounds", "1", "--seed", "4", "--strategy", "fedprox")
    # Assert: rows by strategy, then seed, then round; each seed's rows are that seed's one-seed run.
    assert list(zip(rounds["strategy"], rounds["seed"], rounds["round"])) == [
        (s, seed, r) for s in ("fedavg", "fedprox") for seed in (3, 4) for r in (0, 1)]
    mine = rounds[(rounds["strategy"] == "fedprox") & (rounds["seed"] == 4)].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, one)
    summary = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert summary["seeds"] == [4, 3] and summary["seed"] == 4
    fedprox = summary["strategies"]["fedprox"]
    assert fedprox["seeds"] == [3, 4] and fedprox["stats"]["final_accuracy"]["n"] == 2
    assert fedprox["vs_baseline"]["final_accuracy"]["n"] == 2
    assert [line.split(":")[0].strip() for line in printed[:6]] == [
        "fedavg seed 3", "fedavg seed 4", "fedprox seed 3", "fedprox seed 4", "fedavg", "fedprox"]
    assert "(mean ± 95 % CI over 2 seeds)" in printed[5]
    devices = pd.read_csv(tmp_path / "many" / "devices.csv")
    assert set(devices["seed"]) == {3, 4}
