"""The in-process backend: an implementation of Flower's abstract ``Grid``
that executes the ClientApp synchronously, in this process.

Flower ships no such backend; this one is deterministic, starts at once and
needs no Ray. It follows the contract of Flower's ``InMemoryGrid`` (written
against flwr 1.41): pushed messages get an id, replies are pulled by it, and
a ClientApp that raises yields an error reply instead of an exception.
"""
from __future__ import annotations

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

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            self._count += 1
            message.metadata.__dict__["_message_id"] = f"inprocess-{self._count}"
            self._replies[message.metadata.message_id] = self._execute(message)
            ids.append(message.metadata.message_id)
        return ids

    def _execute(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node not in self.contexts:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"no executor node {node}"), reply_to=message)
        try:
            return self.client_app(message, self.contexts[node])
        except Exception as exc:  # noqa: BLE001 - a failing ClientApp is a failed task, as in Flower
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                           reply_to=message)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(server_app: ServerApp, client_app: ClientApp, executors: int = 1) -> None:
    """Run ``server_app`` against ``client_app`` in this thread."""
    # Flower stamps new messages with the process's task identity; Flower's own
    # runtimes set it, so this backend must too.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, SERVER_NODE_ID, 1
    grid = InProcessGrid(client_app, executors)
    server_app(grid, Context(run_id=RUN_ID, node_id=SERVER_NODE_ID, node_config={},
                             state=RecordDict(), run_config={}))
