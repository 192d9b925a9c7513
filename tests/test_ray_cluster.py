"""The Ray backend joins an existing cluster started with `ray start --head`."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedkd.cli import main

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster():
    # `ray stop` ends every Ray runtime of this user on the machine, so do not run
    # this test beside another Ray job. Stopping only our own head (killing the
    # `ray start --block` process) left its address behind for later in-process
    # runs, whose ray.init() then joined a dead cluster and waited forever.
    port = free_port()
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=120, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120, env=env)


@pytest.mark.ray
def test_a_run_on_a_local_ray_cluster_matches_the_inprocess_run(ray_cluster, write_scenario, tiny_scenario,
                                                                tmp_path):
    tiny_scenario["strategies"] = ["fedavg"]
    local_path = write_scenario(tiny_scenario, "local.yaml")
    tiny_scenario["backend"] = {"kind": "ray", "address": ray_cluster, "executors": 2}
    cluster_path = write_scenario(tiny_scenario, "cluster.yaml")
    assert main(["simulate", str(local_path), "--out", str(tmp_path / "local")]) == 0
    assert main(["simulate", str(cluster_path), "--out", str(tmp_path / "cluster")]) == 0
    local = pd.read_csv(tmp_path / "local" / "rounds.csv")
    cluster = pd.read_csv(tmp_path / "cluster" / "rounds.csv")
    assert cluster["accuracy"].tolist() == pytest.approx(local["accuracy"].tolist(), abs=1e-6)
