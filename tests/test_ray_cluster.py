"""The Ray backend joins an existing cluster started with `ray start --head`."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from fedkd.cli import main

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _our_processes(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (our head's own temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass  # gone already, or not ours to read
    return pids


@pytest.fixture
def ray_cluster():
    """A Ray head of our own, in a temp dir of our own, stopped by killing only its processes.

    ``ray stop`` would end every Ray runtime of the user on the machine; instead the head runs
    with ``--block`` in its own session and its own ``--temp-dir`` (where Ray also records the
    cluster's address, so later in-process runs never find it), and at the end every process
    whose command line names that temp dir is killed, and the dir removed.
    """
    port = free_port()
    # Short and ours: Ray's socket paths under the temp dir must stay within 107 characters.
    temp = tempfile.mkdtemp(prefix="fedkd-ray-", dir="/tmp")
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, head, timeout_s=120)
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in [head.pid, *_our_processes(temp)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(timeout=10)
            deadline = time.monotonic() + 10
            while _our_processes(temp) and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_port(port: int, head: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with code {head.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2)  # the GCS listens before the raylet has registered
                return
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head did not listen on port {port} within {timeout_s} s")


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
