"""fedkd.report with several seeds: the seed and traffic columns, summary.json statistics
against the baseline, and the mean-and-band plots. Hand-made runs; numbers worked out by hand."""
from __future__ import annotations

import json

import matplotlib.axes
import pandas as pd
import pytest

from fedkd.report import _plot, default_baseline, mean_curve, rounds_frame, write_results
from fedkd.results import DeviceRecord, RoundRecord, StrategyRun


def make_run(label: str, strategy: str, seed: int, accuracies: list[float], extra: dict | None = None,
             **fields) -> StrategyRun:
    """Round r: clock 10 r s, accuracy as given; after round 0, 100 B up, 50 B down, 1 J and ``extra``."""
    run = StrategyRun(label, strategy, seed=seed, **fields)
    for r, accuracy in enumerate(accuracies):
        moved = r > 0
        run.rounds.append(RoundRecord(label, r, 10.0 * r, accuracy, 100 * moved, 50 * moved, 1.0 * moved, 1, 0, 4, 0,
                                      dict(extra or {}) if moved else {}))
        if moved:
            run.devices.append(DeviceRecord(label, r, "train", 0, "phone", "failed", "deadline",
                                            0.0, 1.0, 50, 100, 1.0, 5.0))
    return run


@pytest.fixture
def runs() -> list[StrategyRun]:
    # Baseline fedavg: finals 0.5 and 0.7, so the target is their mean, 0.6.
    # fedavg seed 0 never reaches 0.6; seed 1 does at round 1 (10 s).
    # fedmd seed 0 reaches it at round 1 (10 s), seed 1 at round 2 (20 s).
    # fedmd also moves 30 B device-to-device and 20 B of backhaul a round.
    traffic = {"d2d_bytes": 30.0, "backhaul_bytes": 20.0}
    return [make_run("fedavg", "fedavg", 0, [0.1, 0.3, 0.5]),
            make_run("fedavg", "fedavg", 1, [0.1, 0.6, 0.7]),
            make_run("md", "fedmd", 0, [0.1, 0.6, 0.8], traffic,
                     labelled_public={"digest": 10, "calibrate": 5}, labelled_public_total=12),
            make_run("md", "fedmd", 1, [0.1, 0.4, 0.6], traffic, labelled_public={"digest": 8},
                     labelled_public_total=8)]


def write(tmp_path, runs, **kwargs) -> dict:
    write_results(tmp_path, runs, {"scenario": "t", "seed": 0, "seeds": [0, 1]}, **kwargs)
    return json.loads((tmp_path / "summary.json").read_text())


def test_rows_carry_the_seed_and_every_byte(runs, tmp_path):
    write(tmp_path, runs)
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    devices = pd.read_csv(tmp_path / "devices.csv")

    assert list(rounds.columns[:3]) == ["strategy", "seed", "round"]
    assert list(zip(rounds["strategy"], rounds["seed"]))[::3] == [("fedavg", 0), ("fedavg", 1), ("md", 0), ("md", 1)]
    md = rounds[(rounds["strategy"] == "md") & (rounds["seed"] == 1)]
    # A round: 100 up + 50 down + 30 device-to-device + 20 backhaul = 200 B; cum_bytes leaves backhaul out.
    assert md["total_bytes"].tolist() == [0, 200, 200] and md["cum_total_bytes"].tolist() == [0, 200, 400]
    assert md["cum_bytes"].tolist() == [0, 180, 360]
    assert list(devices.columns[:3]) == ["strategy", "seed", "round"] and devices["seed"].tolist() == [0, 0, 1, 1] * 2


def test_statistics_over_seeds_and_against_the_baseline(runs, tmp_path):
    summary = write(tmp_path, runs)
    md, avg = summary["strategies"]["md"], summary["strategies"]["fedavg"]

    assert summary["baseline"] == {"strategy": "fedavg", "target_accuracy": pytest.approx(0.6)}
    assert summary["reference"] == {"strategy": "fedavg", "final_accuracy": pytest.approx(0.6)}
    # fedmd time to 0.6: seeds 10 s and 20 s; mean 15, std sqrt(50) = 7.071068,
    # ci95 = 15 -/+ 12.706205 * 7.071068 / sqrt(2) = 15 -/+ 63.531024.
    time = md["stats"]["time_to_target_s"]
    assert time["per_seed"] == {"0": 10.0, "1": 20.0} and time["n"] == 2 and time["reached"] == "2/2"
    assert time["mean"] == 15 and time["std"] == pytest.approx(7.071068, abs=1e-6)
    assert time["ci95"] == pytest.approx([-48.531024, 78.531024], abs=1e-5)
    # Energy (1 J a round) and bytes (200 B a round) at the same rounds.
    assert md["stats"]["energy_to_target_j"]["per_seed"] == {"0": 1.0, "1": 2.0}
    assert md["stats"]["bytes_to_target"]["per_seed"] == {"0": 200, "1": 400}
    # fedavg seed 0 never reached its own mean: null there, statistic over seed 1 alone.
    assert avg["stats"]["time_to_target_s"] == {"mean": 10.0, "std": None, "ci95": None,
                                                "per_seed": {"0": None, "1": 10.0}, "n": 1, "reached": "1/2"}
    # Final accuracy md - fedavg per seed: 0.8 - 0.5 = 0.3, 0.6 - 0.7 = -0.1; mean 0.1, p 0.704833
    # (worked out in test_stats). Time: only seed 1 has both, 20 - 10 = 10.
    versus = md["vs_baseline"]
    assert versus["final_accuracy"]["mean"] == pytest.approx(0.1)
    assert versus["final_accuracy"]["p_value"] == pytest.approx(0.704833, abs=1e-6)
    assert versus["time_to_target_s"] == {"mean": 10.0, "ci95": None, "p_value": None, "n": 1}
    # Total bytes: 400 - 300 on both seeds: +100, no spread, no test.
    assert versus["total_bytes"] == {"mean": 100.0, "ci95": [100.0, 100.0], "p_value": None, "n": 2}
    # Ratios of the means: time 15 / 10, energy 1.5 / 1, bytes 400 / 300.
    assert versus["ratio"] == pytest.approx({"time_to_target_s": 1.5, "energy_to_target_j": 1.5,
                                             "total_bytes": 4 / 3})
    assert avg["vs_baseline"] is None


def test_older_fields_hold_means_and_sums_over_seeds(runs, tmp_path):
    md = write(tmp_path, runs)["strategies"]["md"]

    assert md["final_accuracy"] == pytest.approx(0.7) and md["total_bytes"] == 400
    assert md["bytes_up"] == 200 and md["seeds"] == [0, 1]
    assert md["failures"] == {"deadline": 4}  # two a seed, summed
    assert md["to_reference_accuracy"] == {"sim_time_s": 15.0, "cum_energy_j": 1.5, "cum_bytes": 270.0}
    assert md["labelled_public"] == {
        "total": 12, "by_purpose": {"calibrate": 5, "digest": 10},
        "per_seed": [{"seed": 0, "total": 12, "by_purpose": {"calibrate": 5, "digest": 10}},
                     {"seed": 1, "total": 8, "by_purpose": {"digest": 8}}]}


def test_one_seed_keeps_plain_numbers(runs, tmp_path):
    summary = write(tmp_path, [runs[1], runs[3]])
    md = summary["strategies"]["md"]

    assert md["final_accuracy"] == 0.6 and md["total_bytes"] == 400 and md["sim_time_s"] == 20.0
    assert md["stats"]["final_accuracy"] == {"mean": 0.6, "std": None, "ci95": None, "per_seed": {"1": 0.6}, "n": 1}
    assert md["labelled_public"] == {"total": 8, "by_purpose": {"digest": 8}}
    # The target is fedavg's own final accuracy, 0.7: md's 0.6 never reaches it.
    assert md["to_reference_accuracy"] == {"sim_time_s": None, "cum_energy_j": None, "cum_bytes": None}
    assert md["vs_baseline"]["time_to_target_s"]["n"] == 0


def test_a_chosen_baseline_sets_the_target(runs, tmp_path):
    summary = write(tmp_path, runs, baseline="md")

    assert summary["baseline"] == {"strategy": "md", "target_accuracy": pytest.approx(0.7)}
    assert summary["strategies"]["md"]["vs_baseline"] is None
    assert summary["strategies"]["fedavg"]["vs_baseline"]["final_accuracy"]["mean"] == pytest.approx(-0.1)


def test_a_header_with_one_seed_names_the_seed_of_every_row(tmp_path):
    # fedkd.flower_app leaves StrategyRun.seed at its default and says the seed in the header.
    write_results(tmp_path, [make_run("fedavg", "fedavg", 0, [0.1, 0.2])], {"scenario": "t", "seed": 7})

    assert set(pd.read_csv(tmp_path / "rounds.csv")["seed"]) == {7}
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [7]


def test_default_baseline_is_the_first_weight_sharing_strategy():
    assert default_baseline([("pooled", "centralized"), ("md", "fedmd"), ("avg", "fedavg")]) == "avg"
    assert default_baseline([("pooled", "centralized"), ("md", "fedmd")]) == "md"  # a reference line is no baseline
    assert default_baseline([("pooled", "centralized")]) == "pooled"


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the stand-ins draw nothing to label
def test_several_seeds_plot_the_mean_with_a_band(runs, monkeypatch):
    drawn = {"plot": [], "band": []}
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn["plot"].append((list(x), list(y), kw.get("label"))))
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, lo, hi, **kw: drawn["band"].append((list(lo), list(hi))))

    assert _plot(rounds_frame(runs), "cum_total_bytes", "bytes", "t")[:4] == b"\x89PNG"

    # md per round, mean over seeds: x (0 + 0) / 2, (200 + 200) / 2, (400 + 400) / 2;
    # accuracy (0.1 + 0.1) / 2, (0.6 + 0.4) / 2, (0.8 + 0.6) / 2.
    x, y, label = drawn["plot"][1]
    assert x == [0, 200, 400] and y == pytest.approx([0.1, 0.5, 0.7]) and label == "md (mean of 2 seeds, 95 % CI)"
    # Round 1: std of (0.6, 0.4) = 0.141421; half-width 12.706205 * 0.141421 / sqrt(2) = 1.270620.
    # Round 0: both seeds 0.1, a band of zero width.
    lo, hi = drawn["band"][1]
    assert lo[:2] == pytest.approx([0.1, 0.5 - 1.270620], abs=1e-6)
    assert hi[:2] == pytest.approx([0.1, 0.5 + 1.270620], abs=1e-6)


def test_a_round_only_one_seed_reached_has_no_band():
    rows = pd.DataFrame({"seed": [0, 0, 1], "round": [0, 1, 0], "t": [0.0, 5.0, 0.0], "accuracy": [0.2, 0.4, 0.4]})

    curve = mean_curve(rows, "t")

    assert curve["x"].tolist() == [0.0, 5.0] and curve["accuracy"].tolist() == pytest.approx([0.3, 0.4])
    assert curve["lo"].iloc[1] == curve["hi"].iloc[1] == pytest.approx(0.4)


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_a_reference_line_sits_at_the_mean_final_accuracy(monkeypatch):
    drawn = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y, **kw: drawn.update(y=y))
    rows = pd.DataFrame({"strategy": ["pooled"] * 4, "seed": [0, 0, 1, 1], "round": [0, 1, 0, 1],
                         "sim_time_s": 0.0, "accuracy": [0.1, 0.8, 0.1, 0.9]})

    _plot(rows, "sim_time_s", "time", "t", frozenset({"pooled"}))

    assert drawn["y"] == pytest.approx(0.85)  # (0.8 + 0.9) / 2
