"""Every shipped scenario runs, in a tiny form: one round, a small population."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedkd.cli import main
from fedkd.checks import load_scenario

from .conftest import REPO

SCENARIOS = sorted((REPO / "scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenario_validates(path: Path):
    load_scenario(path)


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_shipped_scenario_runs_in_tiny_form(path: Path, write_scenario, tmp_path):
    raw = yaml.safe_load(path.read_text())
    raw["rounds"] = 1
    raw["population"]["devices"] = min(raw["population"]["devices"], 40)
    raw["data"]["test_samples"] = 100
    out = tmp_path / "out"
    assert main(["simulate", str(write_scenario(raw)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    assert sorted(rounds["strategy"].unique()) == sorted(s if isinstance(s, str) else s.get("label") or s["name"]
                                                         for s in raw["strategies"])


def test_city_scale_runs_with_its_full_million_devices(write_scenario, tmp_path):
    # Short form: the whole population, one round, about ten devices chosen.
    raw = yaml.safe_load((REPO / "scenarios" / "city_scale.yaml").read_text())
    assert raw["population"]["devices"] == 1_000_000
    raw["rounds"] = 1
    raw["data"]["test_samples"] = 100
    raw["strategies"][0]["params"]["fraction_train"] = 0.00001
    out = tmp_path / "city"
    assert main(["simulate", str(write_scenario(raw)), "--out", str(out)]) == 0
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["participants"].iloc[-1] > 0
    assert rounds["available_devices"].iloc[-1] > 500_000
