"""The processes backend: the same results as in-process, and a dead or hung worker
fails its own task, never the run."""
from __future__ import annotations

import os
import time

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedkd.cli import main
from fedkd.errors import ScenarioError
from fedkd.runtime.inprocess import RUN_ID, SERVER_NODE_ID
from fedkd.runtime.processes import ProcessGrid, WorkerPool, close_pools, worker_pool
from fedkd.scenario import parse_scenario

# A test-only ClientApp: replies with its input doubled; "exit" ends its worker process
# at once, as a segfault or the OOM killer would; "hang" never returns.
app = ClientApp()


@app.train()
def _double(message: Message, context) -> Message:
    x = int(message.content["task"]["x"])
    if message.content["task"]["action"] == "exit":
        os._exit(3)
    if message.content["task"]["action"] == "hang":
        time.sleep(3600)
    if message.content["task"]["action"] == "raise":
        raise ValueError(f"no {x}")
    return Message(RecordDict({"out": ConfigRecord({"y": 2 * x, "pid": os.getpid()})}), reply_to=message)


def _tasks(grid, actions):
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE_ID, 1
    nodes = grid.get_node_ids()
    return [grid.create_message(RecordDict({"task": ConfigRecord({"x": i, "action": a})}), "train",
                                nodes[i % len(nodes)], group_id="1") for i, a in enumerate(actions)]


@pytest.fixture
def grid():
    import cloudpickle

    pool = WorkerPool(cloudpickle.dumps(app), workers=2, flwr_level=30)
    yield ProcessGrid(app, pool)
    pool.close()


def test_replies_come_back_in_order_from_both_workers(grid):
    replies = grid.send_and_receive(_tasks(grid, ["ok"] * 6))
    assert [int(r.content["out"]["y"]) for r in replies] == [0, 2, 4, 6, 8, 10]
    assert len({int(r.content["out"]["pid"]) for r in replies}) == 2  # the work was shared


def test_a_worker_that_dies_fails_its_task_only_and_is_replaced(grid):
    replies = grid.send_and_receive(_tasks(grid, ["ok", "exit", "ok", "raise", "ok"]))
    assert [r.has_error() for r in replies] == [False, True, False, True, False]
    assert replies[1].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "died (exit code 3)" in replies[1].error.reason
    assert replies[3].error.reason == "ValueError: no 3"
    # The pool still has two working processes.
    again = grid.send_and_receive(_tasks(grid, ["ok"] * 4))
    assert [int(r.content["out"]["y"]) for r in again] == [0, 2, 4, 6]


def test_a_hung_task_times_out_and_its_worker_is_killed(grid):
    grid.send_and_receive(_tasks(grid, ["ok"] * 2))  # both workers started: the timeout is the task's alone
    replies = grid.send_and_receive(_tasks(grid, ["hang", "ok", "ok"]), timeout=5)
    assert replies[0].error.code == ErrorCode.REPLY_MESSAGE_UNAVAILABLE
    assert replies[0].error.reason.startswith("timeout:")
    assert [int(r.content["out"]["y"]) for r in replies[1:]] == [2, 4]


def assert_processes_match_inprocess(scenario: dict, write_scenario, tmp_path) -> None:
    """Run ``scenario`` on both backends (2 workers): byte-identical tables (wall times
    live only in summary.json)."""
    path = write_scenario(scenario)
    scenario["backend"] = {**scenario.get("backend", {}), "kind": "processes", "workers": 2}
    parallel = write_scenario(scenario, "parallel.yaml")
    one, two = tmp_path / "inprocess", tmp_path / "processes"
    try:
        assert main(["simulate", str(path), "--out", str(one)]) == 0
        assert main(["simulate", str(parallel), "--out", str(two)]) == 0
    finally:
        close_pools()
    for name in ("rounds.csv", "devices.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_processes_backend_gives_the_same_files_as_inprocess(write_scenario, tiny_scenario, tmp_path):
    # The tiny scenario with FedProx (FedAvg's task plus the proximal term), once per backend.
    tiny_scenario["strategies"] = [{"name": "fedprox", "params": {"proximal_mu": 0.1}}]
    assert_processes_match_inprocess(tiny_scenario, write_scenario, tmp_path)


def test_the_pool_is_kept_for_the_next_run_of_the_same_app():
    try:
        first = worker_pool(app, 1)
        assert worker_pool(app, 1) is first
        assert worker_pool(app, 2) is not first  # another size: a new pool, the old one stopped
        assert first._workers == []
    finally:
        close_pools()


@pytest.mark.parametrize("workers", [0, -1])
def test_zero_workers_is_refused(tiny_scenario, workers):
    tiny_scenario["backend"] = {"kind": "processes", "workers": workers}
    with pytest.raises(ScenarioError, match="backend.workers"):
        parse_scenario(tiny_scenario, "s.yaml")
