"""What every TCP connection of a worker shares: the set of live ones (so shutdown and reload
can wait for, or end, them), the view of the listener that accepted it, its id, and resets.

Python 3.11's ``Server.wait_closed()`` does not wait for open connections, so we track them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

import structlog

from lbd.endpoints.route import Route
from lbd.net.idle import IdleWheel

log = structlog.get_logger("lbd.tcp")
_LINGER_RESET = struct.pack("ii", 1, 0)


class ListenerView(Protocol):
    """What a connection needs of the listener that accepted it."""

    removed: bool  # closed by a reload: its connections drain
    loop: asyncio.AbstractEventLoop  # passed in: asyncio.get_running_loop() costs a getpid()
    filtered: bool  # loadBalancerSourceRanges apply

    @property
    def route(self) -> Route: ...  # the service port it serves now (a reload may change it)

    @property
    def external(self) -> bool: ...  # externalTrafficPolicy applies (not a clusterIP listener)


# Connection ids: unique per process, and across the workers of one lbd (the pid is part of
# each), short enough to grep. Every log line about a connection carries its id.
_PID_PREFIX = f"{os.getpid():x}"
next_serial = itertools.count(1).__next__


def connection_id(serial: int) -> str:
    return f"{_PID_PREFIX}-{serial:x}"


def send_reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST instead of a FIN, dropping anything still buffered."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # OSError: the socket is already gone, and abort() below is all that is left to do.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


class Closable(Protocol):
    def finish(self, reason: str, *, abort: bool = False) -> None: ...


class Abortable(Protocol):
    def abort(self) -> None: ...


T = TypeVar("T", bound=Closable)


class ConnectionSet(Generic[T]):
    __slots__ = ("_empty", "_items", "idle", "lingering")

    def __init__(self) -> None:
        self._items: set[T] = set()
        self._empty: asyncio.Event | None = None
        self.idle = IdleWheel()  # the idle deadlines of these connections, one timer for all
        # What outlives its ended connection for a while: a fault's delayed bytes or FIN, a
        # mirror's last copy (lbd.net.tcp_faults). Shutdown aborts what is still there.
        self.lingering: set[Abortable] = set()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        """A snapshot: callers may finish (and so remove) connections while iterating."""
        return iter(list(self._items))

    def add(self, item: T) -> None:
        self._items.add(item)

    def discard(self, item: T) -> None:
        self._items.discard(item)
        if not self._items and self._empty is not None:
            self._empty.set()

    async def wait_empty(self) -> None:
        if not self._items:
            return
        self._empty = asyncio.Event()
        await self._empty.wait()


class Logged(Protocol):
    """What the access log line says about a connection."""

    route: Route
    client: str
    received: int
    sent: int
    started: float
    loop: asyncio.AbstractEventLoop

    @property
    def id(self) -> str: ...


def log_closed(connection: Logged, endpoint: object, reason: str) -> None:
    """The access log's line for a connection that ended (``accessLog: true``)."""
    route = connection.route
    log.info(
        "connection closed",
        connection=connection.id,
        service=f"{route.namespace}/{route.service}",
        port=route.port_name,
        client=connection.client,
        endpoint=str(endpoint) if endpoint is not None else None,
        bytes_received=connection.received,
        bytes_sent=connection.sent,
        duration_s=round(connection.loop.time() - connection.started, 6),
        end=reason,
    )
