"""The in-process backend: an implementation of Flower's abstract ``Grid``
that executes the ClientApp synchronously, in this process.

Flower ships no such backend; this one is deterministic, starts at once and
needs no Ray. It follows the contract of Flower's ``InMemoryGrid`` (written
against flwr 1.41): pushed messages get an id, replies are pulled by it, and
a ClientApp that raises yields an error reply instead of an exception.

With ``backend.batch_devices`` > 1, fedkd's ClientApp groups a phase's
messages into units it runs as one batched computation
(``FedkdClientApp.batch_units`` / ``run_batch``); a unit that raises runs
again one message at a time.

``send_and_receive(messages, timeout=T)`` gives each ClientApp call at most T
seconds of wall time (a unit of k messages k * T): calls run one after another on a worker thread, and one
that has not returned by then yields an error reply (``REPLY_MESSAGE_UNAVAILABLE``,
which the simulated grid records as reason ``timeout``). Python cannot stop a
thread, so a hung call is abandoned, not killed: its thread (a daemon, which
does not keep the process alive) goes on in the background, its late reply is
dropped, and the next call gets a new worker thread.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1
RUN_ID = 1


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, executors: int = 1):
        self.client_app = client_app
        self.node_ids = list(range(1001, 1001 + executors))
        self.contexts = {n: Context(run_id=RUN_ID, node_id=n, node_config={}, state=RecordDict(),
                                    run_config={}) for n in self.node_ids}
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}
        self._count = 0
        self._worker: _Worker | None = None

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message], timeout: float | None = None) -> list[str]:
        messages = list(messages)
        for message in messages:
            self._count += 1
            message.metadata.__dict__["_message_id"] = f"inprocess-{self._count}"
        for unit in self._units(messages):
            for message, reply in zip(unit, self._execute(unit, timeout)):
                self._replies[message.metadata.message_id] = reply
        return [m.metadata.message_id for m in messages]

    def _units(self, messages: list[Message]) -> list[list[Message]]:
        """``messages`` as units of work: batches a fedkd ClientApp can run together
        (``backend.batch_devices``), else one message each. Messages for unknown nodes
        stay alone (they fail with NODE_UNAVAILABLE)."""
        known = [i for i, m in enumerate(messages) if m.metadata.dst_node_id in self.contexts]
        units = [[i] for i, m in enumerate(messages) if m.metadata.dst_node_id not in self.contexts]
        if hasattr(self.client_app, "batch_units") and known:
            context = self.contexts[self.node_ids[0]]
            units += [[known[j] for j in unit]
                      for unit in self.client_app.batch_units([messages[i] for i in known], context)]
        else:
            units += [[i] for i in known]
        return [[messages[i] for i in unit] for unit in sorted(units, key=lambda unit: unit[0])]

    def _execute(self, unit: list[Message], timeout: float | None = None) -> list[Message]:
        node = unit[0].metadata.dst_node_id
        if node not in self.contexts:
            return [Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no executor node {node}"), reply_to=unit[0])]
        if timeout is None:
            return run_unit(self.client_app, unit, self.contexts[node])
        # One long-lived worker, not a thread per call: a new thread costs torch a few ms to set up.
        self._worker = self._worker or _Worker()
        # A batch of k tasks may take k tasks' time.
        finished, outcome = self._worker.run(lambda: run_unit(self.client_app, unit, self.contexts[node]),
                                             timeout * len(unit))
        if not finished:  # the worker is stuck in the hung call: abandon it, ending once the call does
            self._worker.stop()
            self._worker = None
            return [Message(Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
                                  f"timeout: the ClientApp gave no reply within {timeout:g} s"), reply_to=m)
                    for m in unit]
        if outcome is None:  # a BaseException (SystemExit, ...) ended the call
            return [Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "the ClientApp ended without a reply"),
                            reply_to=m) for m in unit]
        return outcome

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages, timeout))

    def close(self) -> None:
        """Let the worker thread end."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None


def run_unit(client_app: ClientApp, unit: list[Message], context: Context) -> list[Message]:
    """Replies to ``unit``: one batched call when it holds several messages (and, if that
    raises, each message on its own), else the ClientApp's call. A call that raises
    yields an error reply, as in Flower."""
    if len(unit) > 1:
        try:
            return client_app.run_batch(unit, context)
        except Exception:  # noqa: BLE001 - one by one below: each task then fails or not on its own
            pass
    return [_call(client_app, message, context) for message in unit]


def _call(client_app: ClientApp, message: Message, context: Context) -> Message:
    try:
        return client_app(message, context)
    except Exception as exc:  # noqa: BLE001 - a failing ClientApp is a failed task, as in Flower
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                       reply_to=message)


class _Worker:
    """A daemon thread that runs calls in turn, each waited for at most a timeout."""

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="fedkd-clientapp", daemon=True).start()

    def _serve(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            call, box, done = item
            try:
                box.append(call())
            except BaseException:  # noqa: BLE001 - ends this call, not the worker
                pass
            finally:
                done.set()

    def run(self, call, timeout: float) -> tuple[bool, list[Message] | None]:
        """(whether ``call`` finished within ``timeout`` s, what it returned)."""
        box: list[list[Message]] = []
        done = threading.Event()
        self._calls.put((call, box, done))
        finished = done.wait(timeout)
        return finished, (box[0] if box else None)

    def stop(self) -> None:
        self._calls.put(None)


def run_inprocess(server_app: ServerApp, client_app: ClientApp, executors: int = 1) -> None:
    """Run ``server_app`` against ``client_app`` in this thread."""
    # Flower stamps new messages with the process's task identity; Flower's own
    # runtimes set it, so this backend must too.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE_ID, 1
    grid = InProcessGrid(client_app, executors)
    try:
        server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                                 state=RecordDict(), run_config={}))
    finally:
        grid.close()
