"""An in-process Flower Grid: the real ServerApp and ClientApp objects, no SuperLink, no Ray.

Each virtual SuperNode has its own ``Context`` (with ``partition-id``/``num-partitions`` and a
persistent ``state``), exactly as the simulation runtime keeps them; messages are handed to
``ClientApp.__call__`` one after the other. Good for tests and for debugging the glue.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run


def ensure_task_identity() -> None:
    """Give this process the task identity Flower's runtimes set (Message() needs a run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("run_id", 1), ("node_id", 0), ("task_id", 1)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:  # not set: this process is not inside a Flower runtime
            setattr(TaskIdentity, attr, value)


class InProcessGrid(Grid):
    """Delivers messages to ``num_nodes`` in-process ClientApps; keeps every reply for inspection."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any] | None = None,
                 first_node_id: int = 1000) -> None:
        ensure_task_identity()
        self.client_app = client_app
        self._run = Run.create_empty(1)
        self.contexts = {first_node_id + i: Context(run_id=1, node_id=first_node_id + i,
                                                    node_config={"partition-id": i, "num-partitions": num_nodes},
                                                    state=RecordDict(), run_config=dict(run_config or {}))
                         for i in range(num_nodes)}
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = 0
            self.sent.append(msg)
            # a private copy, as after serialisation: handlers (e.g. SecAgg+'s mod) may mutate content
            delivered = Message(content=copy.deepcopy(msg.content), metadata=copy.copy(msg.metadata))
            try:
                reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - a client failure becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.received.append(reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int,
                  run_config: dict[str, Any] | None = None) -> InProcessGrid:
    """Run a ServerApp against ``num_nodes`` in-process ClientApps; returns the grid (with the traffic)."""
    grid = InProcessGrid(client_app, num_nodes, run_config)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config or {}))
    server_app(grid, ctx)
    return grid
