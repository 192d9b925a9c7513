"""--jobs: (seed, strategy) runs side by side in worker processes give the same files."""
from __future__ import annotations

from fedkd.cli import main


def test_runs_in_worker_processes_equal_runs_one_by_one(write_scenario, tiny_scenario, tmp_path):
    # Prepare: two strategies, two seeds: four runs.
    path = write_scenario(tiny_scenario)
    one, two = tmp_path / "one", tmp_path / "two"
    # Execute
    assert main(["simulate", str(path), "--seeds", "0-1", "--jobs", "1", "--out", str(one)]) == 0
    assert main(["simulate", str(path), "--seeds", "0-1", "--jobs", "2", "--out", str(two)]) == 0
    # Assert: byte-identical tables (wall times live only in summary.json).
    for name in ("rounds.csv", "devices.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
