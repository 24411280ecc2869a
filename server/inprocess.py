"""A Flower ``Grid`` that delivers messages to a ClientApp in this process (no SuperLink, no Ray).

For tests, benchmarks and quick experiments: the server loop, the strategies and the real ClientApp
code run exactly as in a simulation, but each node's ClientApp is called in a thread of this process.
Messages are deep-copied both ways, as a transport would, so neither side can see the other's
objects. A node's reply that takes longer than ``send_and_receive``'s timeout is missing from the
result, as with Flower's own grids; a ClientApp that raises becomes an error reply.
"""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from server.messaging import exchange

ClientCallable = Callable[[Message, Context], Message]
#: the SuperLink's own node id (Flower's ``SUPERLINK_NODE_ID``)
SERVER_NODE_ID = 1


class InProcessGrid(Grid):
    """Deliver messages to in-process ClientApps, one per node.

    Args:
        clients: one ClientApp (or any ``(message, context) -> message`` callable) per node.
        node_configs: the node config of each node (e.g. ``{"partition-id": 0, "num-partitions": 2}``).
        run_config: the run-config every node sees (``context.run_config``).
        run_id: run id put on the messages.

    Raises:
        ValueError: ``clients`` and ``node_configs`` differ in length, or no node.
    """

    def __init__(
        self,
        clients: Sequence[ClientCallable],
        node_configs: Sequence[Mapping[str, Any]],
        run_config: Mapping[str, Any] | None = None,
        run_id: int = 1,
    ) -> None:
        if len(clients) != len(node_configs) or not clients:
            raise ValueError(
                f"need one node config per client, got {len(clients)} clients and "
                f"{len(node_configs)} node configs"
            )
        self._run_id = int(run_id)
        self._node_ids = [1000 + i for i in range(len(clients))]
        self._clients = dict(zip(self._node_ids, clients, strict=True))
        self._contexts = {
            n: Context(
                run_id=self._run_id,
                node_id=n,
                node_config=dict(nc),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for n, nc in zip(self._node_ids, node_configs, strict=True)
        }
        self._replies: dict[str, Message] = {}
        self._lock = threading.Lock()
        self.disconnected: set[int] = set()
        # the runtime normally sets this identity for the ServerApp process; messages need it
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, self._run_id, SERVER_NODE_ID

    @property
    def node_ids(self) -> list[int]:
        """Every node, connected or not."""
        return list(self._node_ids)

    def set_run(self, run: Any) -> None:  # noqa: D102 - nothing to set up in-process
        pass

    @property
    def run(self) -> Any:  # noqa: D102
        raise NotImplementedError("InProcessGrid has no Run object")

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Deprecated in Flower; build ``Message`` directly."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes."""
        return [n for n in self._node_ids if n not in self.disconnected]

    def _deliver(self, msg: Message) -> None:
        node = msg.metadata.dst_node_id
        inbound = copy.deepcopy(msg)
        try:
            reply = self._clients[node](inbound, self._contexts[node])
        except Exception as exc:  # what Flower does with an exception raised in a ClientApp
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"),
                reply_to=inbound,
            )
        with self._lock:
            self._replies[msg.metadata.message_id] = copy.deepcopy(reply)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Start each message's ClientApp call in a thread; return the message ids."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            ids.append(msg.metadata.message_id)
            if msg.metadata.dst_node_id in self.disconnected:
                continue
            threading.Thread(target=self._deliver, args=(msg,), daemon=True).start()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that have arrived for ``message_ids`` (each is returned once)."""
        with self._lock:
            return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` seconds have passed."""
        return exchange(self, list(messages), timeout)
