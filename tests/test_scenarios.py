"""Every shipped scenario runs, in a tiny form: one round, a small population."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedkd.cli import main
from fedkd.scenario import load_scenario

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
