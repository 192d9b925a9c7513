"""Shared fixtures: tiny scenarios that run in seconds on the in-process backend."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Runs one after another in the test process unless a test asks for --jobs: fast to start, and
# a failure shows its own traceback.
os.environ["FEDKD_JOBS"] = "1"

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seed": 3,
    "rounds": 2,
    "data": {"dataset": "av_digits", "options": {"image_size": 14},
             "partition": {"label_alpha": 1.0, "samples_per_device": 20}, "test_samples": 120},
    "population": {"devices": 12, "classes": [
        {"name": "phone", "share": 0.5, "modalities": ["audio"], "compute_flops": 1e9,
         "uplink_bps": 1e6, "downlink_bps": 4e6, "battery_j": 500.0},
        {"name": "camera", "share": 0.5, "modalities": ["image"], "compute_flops": 1e9,
         "uplink_bps": 1e6, "downlink_bps": 4e6},
    ]},
    "world": {"round_deadline_s": 60},
    "training": {"local_epochs": 1, "batch_size": 10},
    "strategy_defaults": {"fraction_train": 0.5, "fraction_evaluate": 0.0, "min_available_nodes": 2},
    "strategies": ["fedavg", {"name": "fedprox", "params": {"proximal_mu": 0.1}}],
}


@pytest.fixture
def tiny_scenario() -> dict:
    """A fresh, mutable copy of the tiny scenario as plain data."""
    return copy.deepcopy(TINY)


@pytest.fixture
def write_scenario(tmp_path):
    """Write a scenario dict (or raw text) to a YAML file and return its path."""

    def write(content, name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return write
