"""What every TCP connection of a worker shares: the set of live ones (so shutdown and reload
can wait for, or end, them), the view of the listener that accepted it, and its id.

Python 3.11's ``Server.wait_closed()`` does not wait for open connections, so we track them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from lbd.endpoints.route import Route
from lbd.net.idle import IdleWheel
from lbd.net.reactor import Reactor

CONNECT_TICK = 0.01


class ListenerView(Protocol):
    """What a connection needs of the listener that accepted it."""

    removed: bool  # closed by a reload: its connections drain
    loop: asyncio.AbstractEventLoop  # passed in: asyncio.get_running_loop() costs a getpid()
    reactor: Reactor  # the loop's epoll set, which the connection's sockets join
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


class Closable(Protocol):
    def finish(self, reason: str, *, abort: bool = False) -> None: ...


class Abortable(Protocol):
    def abort(self) -> None: ...


T = TypeVar("T", bound=Closable)


class ConnectionSet(Generic[T]):
    __slots__ = ("_empty", "_items", "connecting", "idle", "lingering")

    def __init__(self) -> None:
        self._items: set[T] = set()
        self._empty: asyncio.Event | None = None
        self.idle = IdleWheel()  # the idle deadlines of these connections, one timer for all
        # The deadlines of their connect tries (lbd.net.connect), fired at most 10 ms late.
        self.connecting = IdleWheel(CONNECT_TICK)
        # What outlives its ended connection for a while: a mirror's last copy
        # (lbd.net.mirror). Shutdown aborts what is still there.
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
