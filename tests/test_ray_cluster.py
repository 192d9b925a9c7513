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


@pytest.fixture(scope="module")
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


@pytest.mark.ray
def test_runs_as_ray_tasks_on_the_cluster_equal_runs_one_by_one_in_process(ray_cluster, write_scenario,
                                                                          tiny_scenario, tmp_path, monkeypatch):
    # Prepare: two strategies on two seeds (four runs), once in this process one by one,
    # once as Ray tasks on the cluster, two at a time.
    import fedkd.ray_jobs

    submitted: list[int] = []
    real = fedkd.ray_jobs.run_on_ray
    monkeypatch.setattr(fedkd.ray_jobs, "run_on_ray",
                        lambda tasks, *args, **kw: submitted.append(len(tasks)) or real(tasks, *args, **kw))
    local_path = write_scenario(tiny_scenario, "local.yaml")
    tiny_scenario["backend"] = {"kind": "ray", "address": ray_cluster}
    cluster_path = write_scenario(tiny_scenario, "cluster.yaml")
    # Execute
    assert main(["simulate", str(local_path), "--seeds", "0-1", "--jobs", "1", "--out", str(tmp_path / "local")]) == 0
    assert main(["simulate", str(cluster_path), "--seeds", "0-1", "--jobs", "2",
                 "--out", str(tmp_path / "cluster")]) == 0
    # Assert: byte-identical tables (each task runs its devices in-process on its node), and the
    # checkpoints this process wrote as the runs finished are cleared with the results written.
    for name in ("rounds.csv", "devices.csv"):
        assert (tmp_path / "cluster" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert submitted == [4]
    assert not (tmp_path / "cluster" / ".checkpoint").exists()


@pytest.mark.ray
def test_a_run_that_fails_on_the_cluster_is_one_line_naming_it(ray_cluster, write_scenario, tiny_scenario,
                                                                tmp_path, capsys):
    # Prepare: a plug-in strategy whose every round fails, as a file the cluster's nodes can read.
    plugin = tmp_path / "broken.py"
    plugin.write_text(
        "from flwr.serverapp.strategy import FedAvg\n\n\n"
        "class Broken(FedAvg):\n"
        "    def aggregate_train(self, server_round, replies):\n"
        "        raise ValueError('broken on purpose')\n")
    tiny_scenario["strategies"] = ["fedavg", f"{plugin}:Broken"]
    tiny_scenario["backend"] = {"kind": "ray", "address": ray_cluster}
    path = write_scenario(tiny_scenario)
    # Execute
    code = main(["simulate", str(path), "--jobs", "2", "--out", str(tmp_path / "out")])
    # Assert: exit 2, one line that names the run, the cause and the plug-in's line.
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"run {plugin}:Broken seed 3 failed: ValueError: broken on purpose (at {plugin}:6, in aggregate_train)" \
        in err[0]


@pytest.mark.ray
def test_every_round_of_every_ray_task_is_reported(ray_cluster, tiny_scenario):
    # Prepare: FedAvg on two seeds, as two Ray tasks on the cluster.
    import io

    from fedkd.parallel import RunTask
    from fedkd.ray_jobs import run_on_ray
    from fedkd.runner import for_seed
    from fedkd.scenario import parse_scenario

    tiny_scenario["backend"] = {"kind": "ray", "address": ray_cluster}
    scenario = parse_scenario(tiny_scenario, "tiny.yaml")
    tasks = [RunTask(for_seed(scenario, seed), 0, None) for seed in (0, 1)]
    seen: list[tuple[int, str, int]] = []

    class Pipe(io.StringIO):  # not a terminal: rounds go to the callbacks
        def isatty(self) -> bool:
            return False

    # Execute
    runs = run_on_ray(tasks, 2, scenario.backend, lambda seed: lambda label, record, total: seen.append(
        (seed, label, record.round)), stream=Pipe())
    # Assert: each run's rounds 0 (the initial model's score), 1 and 2, in order within the run.
    for seed in (0, 1):
        assert [r for s, lab, r in seen if (s, lab) == (seed, "fedavg")] == [0, 1, 2]
    assert sorted(run.seed for run in runs) == [0, 1]
