"""Every message between lbd's processes, typed: supervisor ↔ worker, and old lbd ↔ successor.

A message is a frozen dataclass; the channel (``lbd.process.channel``) pickles it, with any
listening sockets riding alongside. Receivers dispatch by type through one table
(``Handlers``), so an unknown or unexpected message is dropped in one place (its sockets
closed), never mis-read. A ``Request`` carries an ``id``; its ``Reply`` carries the same one.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lbd.config.routes import RouteKey
from lbd.health.registry import CheckKey
from lbd.observability.snapshot import Snapshot
from lbd.shm.counts import SlotKey

SocketKey = tuple[object, ...]  # ListenerSpec.identity, or ADMIN_KEY
SlotTable = dict[SlotKey, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    id: int = 0  # set by the sender's ``ask``


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    id: int  # the request's


# -- supervisor → worker ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The first message a worker gets: what to serve (the listening sockets ride along, in
    the order of ``keys``)."""

    path: str
    data: bytes  # the config file's bytes, as the supervisor read and checked them
    node_name: str | None
    proxy_name: str | None
    keys: list[SocketKey]
    slots: SlotTable
    index: int
    health: dict[CheckKey, bool]  # the probing worker's verdicts so far


@dataclass(frozen=True, slots=True, kw_only=True)
class Reload(Request):
    reason: str
    data: bytes
    keys: list[SocketKey]  # sockets of listeners this reload adds ride along
    slots: SlotTable


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotRequest(Request):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminRequest(Request):
    view: str  # lbd.admin.views.call's name
    query: dict[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpSocketsRequest(Request):
    """A seamless restart: copies of the worker's own UDP listening sockets, for the worker of
    the same index in the successor (``lbd.process.udp_handoff``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SuccessorServes(Request):
    """The successor reads these UDP sockets of the worker now (ListenerSpec identities): at
    SIGTERM their sessions drain instead of ending."""

    keys: list[SocketKey]


# -- worker → supervisor ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class StartFailed:
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadDone(Reply):
    outcome: str
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotReply(Reply):
    snapshot: Snapshot


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminReply(Reply):
    status: int  # 200, 400 or 404
    body: dict[str, Any] | None = None
    error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpSocketsReply(Reply):
    keys: list[SocketKey]  # the sockets travel beside the message, in this order
    sockets: list[socket.socket] = field(default_factory=list)  # set on receipt (WorkerSet)


@dataclass(frozen=True, slots=True, kw_only=True)
class Acknowledged(Reply):
    pass


# -- either way: state every worker must share --------------------------------------------------


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    """The probing worker's transition for a checked endpoint; relayed to the others."""

    key: CheckKey
    healthy: bool


@dataclass(frozen=True, slots=True)
class Ejection:
    """An outlier ejection (``seconds`` 0: it ended early); relayed to the other workers."""

    route: RouteKey
    address: str
    port: int
    seconds: float


# -- a running lbd ↔ its successor (seamless restart) ------------------------------------------


@dataclass(frozen=True, slots=True)
class HandoffSockets:
    keys: list[SocketKey]  # the sockets ride along, in this order


@dataclass(frozen=True, slots=True)
class HandoffReady:
    """The successor serves: the predecessor may stop accepting, and stop reading the UDP
    sockets the successor took (``taken``: their keys)."""

    taken: list[SocketKey] = field(default_factory=list)


Message = (
    Start
    | Reload
    | SnapshotRequest
    | AdminRequest
    | UdpSocketsRequest
    | SuccessorServes
    | Ready
    | StartFailed
    | ReloadDone
    | SnapshotReply
    | AdminReply
    | UdpSocketsReply
    | Acknowledged
    | HealthVerdict
    | Ejection
    | HandoffSockets
    | HandoffReady
)
Handler = Callable[[Any, list[socket.socket]], None]
Handlers = dict[type, Handler]


def dispatch(handlers: Handlers, message: object, sockets: list[socket.socket]) -> None:
    """Call the handler for ``message``'s type; a message nobody handles is dropped, and so are
    its sockets (a handler owns the sockets it is given)."""
    handler = handlers.get(type(message))
    if handler is None:
        for sock in sockets:
            sock.close()
        return
    handler(message, sockets)
