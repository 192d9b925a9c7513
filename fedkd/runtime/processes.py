"""The processes backend: the in-process grid's contract, with the ClientApp
calls of one ``send_and_receive`` spread over local worker processes.

No Ray: workers are spawned (a forked torch may deadlock in its thread pool),
each receives the ClientApp once (pickled with cloudpickle, which carries the
closure and so the scenario) and loads the dataset lazily, once, on its first
task; the pool outlives one strategy run, so the next run of the same
scenario reuses warm workers. Each task is a pure function of its message
(seeds come from the scenario, the device and the round, and every call runs
on one torch thread), so replies are the same whichever worker computes them;
they come back in the order the messages were pushed. With
``backend.batch_devices`` > 1 a worker receives a unit of messages the
ClientApp runs as one batch (``FedkdClientApp.batch_units``, planned in this
process from the messages alone), so every backend makes the same batches and
gets the same numbers.

The pool is small and explicit rather than ``concurrent.futures``: it knows
which worker runs which task, so a worker that dies (os._exit, a segfault, the
OOM killer) fails exactly that task, with the exit code as the reason, and
is replaced; and a task over the timeout is stopped by killing its worker,
not abandoned as a thread must be.

``--jobs`` does not multiply processes: the runner runs (seed, strategy) runs side
by side only on the ``inprocess`` backend, so runs on this one go one after
another and never use more than ``workers`` processes.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import multiprocessing
import pickle
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import cloudpickle
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import ServerApp
from flwr.supercore.task_identity import TaskIdentity

from .inprocess import RUN_ID, SERVER_NODE_ID, InProcessGrid, run_unit

_STOP = None  # sent to a worker: finish


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    task: int | None = None  # index of the message it is running
    started_s: float = 0.0


class WorkerPool:
    """``workers`` processes that run a pickled ClientApp on messages."""

    def __init__(self, app_bytes: bytes, workers: int, flwr_level: int):
        self.app_bytes, self.size, self.flwr_level = app_bytes, workers, flwr_level
        self._context = multiprocessing.get_context("spawn")
        # Started now, not on the first round: the imports (torch, Flower) overlap the
        # server's own set-up.
        self._workers = [self._start() for _ in range(workers)]

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self.app_bytes, self.flwr_level),
                                        name="fedkd-worker", daemon=True)
        process.start()
        child.close()  # the parent keeps only its end: a dead worker then reads as EOF
        return _Worker(process, parent)

    def run(self, units: list[list[Message]], timeout: float | None) -> list[list[Message]]:
        """Replies per unit of messages (one message, or a batch the ClientApp runs together),
        in order: the ClientApp's, or error replies when the call raised, its worker died,
        or it ran longer than ``timeout`` s per message."""
        replies: list[list[Message] | None] = [None] * len(units)
        queue = deque(range(len(units)))
        while queue or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.task is None and queue:
                    worker.task, worker.started_s = queue.popleft(), time.monotonic()
                    try:
                        worker.conn.send(units[worker.task])
                    except (OSError, EOFError):  # it died while idle: its task goes to a new one
                        queue.appendleft(worker.task)
                        self._replace(worker)
            busy = [w for w in self._workers if w.task is not None]
            wait_s = None
            if timeout is not None:
                wait_s = max(0.0, min(w.started_s + timeout * len(units[w.task]) for w in busy) - time.monotonic())
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], wait_s))
            for worker in busy:
                unit = units[worker.task]
                if worker.conn in ready or worker.process.sentinel in ready:
                    try:
                        replies[worker.task] = worker.conn.recv()
                        worker.task = None
                        continue
                    except (OSError, EOFError):  # the worker ended without a reply
                        worker.process.join(5)
                        code = worker.process.exitcode
                        replies[worker.task] = [_error(m, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                                       f"the worker process running this task died "
                                                       f"(exit code {code})") for m in unit]
                elif timeout is not None and time.monotonic() - worker.started_s >= timeout * len(unit):
                    replies[worker.task] = [_error(m, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                                                   f"timeout: the ClientApp gave no reply within {timeout:g} s")
                                            for m in unit]
                else:
                    continue
                self._replace(worker)
        return replies  # type: ignore[return-value]

    def _replace(self, worker: _Worker) -> None:
        """Stop ``worker`` (if it still runs) and put a fresh one in its place."""
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(5)
        worker.conn.close()
        fresh = self._start()
        worker.process, worker.conn, worker.task = fresh.process, fresh.conn, None

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(_STOP)
            except (OSError, EOFError):
                pass
        for worker in self._workers:
            worker.process.join(5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
            worker.conn.close()
        self._workers = []


def _error(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code, reason), reply_to=message)


def _serve(conn: Connection, app_bytes: bytes, flwr_level: int) -> None:
    """A worker: run the ClientApp on each message received until told to stop."""
    import flwr.supercore.logger  # noqa: F401 - Flower sets its level on import; override it after

    # Ctrl-C reaches the whole process group: the parent decides (and stops the pool), so a
    # worker does not die mid-task printing a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("flwr").setLevel(flwr_level)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE_ID, 1
    app: ClientApp = pickle.loads(app_bytes)
    contexts: dict[int, Context] = {}
    while True:
        try:
            unit = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if unit is _STOP:
            return
        node = unit[0].metadata.dst_node_id
        context = contexts.setdefault(node, Context(run_id=RUN_ID, node_id=node, node_config={},
                                                    state=RecordDict(), run_config={}))
        replies = run_unit(app, unit, context)
        try:
            conn.send(replies)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            conn.send([_error(m, ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                              f"the reply could not be sent back: {type(exc).__name__}: {exc}") for m in unit])


class ProcessGrid(InProcessGrid):
    """The in-process grid, but ``push_messages`` runs its batch on a worker pool."""

    def __init__(self, client_app: ClientApp, pool: WorkerPool):
        super().__init__(client_app, executors=pool.size)
        self.pool = pool

    def push_messages(self, messages, timeout: float | None = None) -> list[str]:
        messages = list(messages)
        for message in messages:
            self._count += 1
            message.metadata.__dict__["_message_id"] = f"processes-{self._count}"
        units = self._units(messages)
        unknown = [u for u in units if u[0].metadata.dst_node_id not in self.contexts]
        runnable = [u for u in units if u[0].metadata.dst_node_id in self.contexts]
        for (message,) in unknown:
            self._replies[message.metadata.message_id] = _error(
                message, ErrorCode.NODE_UNAVAILABLE, f"no executor node {message.metadata.dst_node_id}")
        for unit, replies in zip(runnable, self.pool.run(runnable, timeout)):
            for message, reply in zip(unit, replies):
                self._replies[message.metadata.message_id] = reply
        return [m.metadata.message_id for m in messages]


# One pool per process, kept for the next run of the same ClientApp (the same scenario):
# starting workers and loading the dataset in each costs seconds.
_POOL: dict[str, WorkerPool] = {}


def worker_pool(client_app: ClientApp, workers: int) -> WorkerPool:
    app_bytes = cloudpickle.dumps(client_app)
    key = f"{hashlib.sha256(app_bytes).hexdigest()}:{workers}"
    if key not in _POOL:
        close_pools()
        _POOL[key] = WorkerPool(app_bytes, workers, logging.getLogger("flwr").level)
    return _POOL[key]


@atexit.register
def close_pools() -> None:
    """Stop the kept worker pool, if any."""
    while _POOL:
        _, pool = _POOL.popitem()
        pool.close()


def run_processes(server_app: ServerApp, client_app: ClientApp, workers: int) -> None:
    """Run ``server_app`` in this thread, its ClientApp calls on ``workers`` processes."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE_ID, 1
    grid = ProcessGrid(client_app, worker_pool(client_app, workers))
    server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                             state=RecordDict(), run_config={}))
