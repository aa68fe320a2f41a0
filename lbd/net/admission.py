"""Connection limits of one service port: HAProxy's maxconn + queue.

A new connection is admitted when the port is under ``maxConnections`` and some eligible
endpoint is under ``maxConnectionsPerEndpoint``; otherwise it waits (reading paused) in a
bounded FIFO queue for up to ``queueTimeout`` and is admitted when a connection ends, or is
refused (reset) and counted. A full queue refuses at once. The queue is an insertion-ordered
dict, so a queued client that gives up leaves it in O(1).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from lbd.config.model import Limits

if TYPE_CHECKING:
    from lbd.pool import Pool
    from lbd.route import RouteStats


class Waiter(Protocol):
    @property
    def external(self) -> bool:
        """Accepted on an external listener (traffic policies may give it other endpoints)."""
        ...

    def admitted(self) -> None:
        """Leave the queue and go on: the connection now holds a slot."""
        ...

    def finish(self, reason: str, *, abort: bool = False) -> None: ...


class Admission:
    __slots__ = ("_queue", "active", "limits", "pool", "stats")

    def __init__(self, limits: Limits, pool: Pool, stats: RouteStats) -> None:
        self.limits = limits
        self.pool = pool
        self.stats = stats
        self.active = 0  # connections holding a slot (connecting or connected)
        self._queue: dict[Waiter, asyncio.TimerHandle] = {}

    @property
    def queued(self) -> int:
        return len(self._queue)

    def has_room(self, external: bool) -> bool:
        limits = self.limits
        if limits.max_connections is not None and self.active >= limits.max_connections:
            return False
        per_endpoint = limits.max_connections_per_endpoint
        if per_endpoint is not None:
            return any(m.active < per_endpoint for m in self.pool.eligible(external))
        return True

    def request(self, waiter: Waiter) -> bool | None:
        """True: admitted now. None: queued (``waiter.admitted()`` or ``finish`` follows).
        False: refused, the queue is full (counted)."""
        if not self._queue and self.has_room(waiter.external):
            self.active += 1
            return True
        if len(self._queue) >= self.limits.max_queue:
            self.stats.downstream_cx_overflow += 1
            return False
        loop = asyncio.get_running_loop()
        self._queue[waiter] = loop.call_later(self.limits.queue_timeout, self._expire, waiter)
        self.stats.downstream_cx_queued += 1
        return None

    def leave(self, waiter: Waiter) -> None:
        """A queued connection ended on its own (the client went away)."""
        timer = self._queue.pop(waiter, None)
        if timer is not None:
            timer.cancel()

    def release(self) -> None:
        """An admitted connection ended: its slot goes to the head of the queue."""
        self.active -= 1
        self.wake()

    def wake(self) -> None:
        """Admit queued connections while there is room (after a release or a reload)."""
        queue = self._queue
        while queue and self.has_room(next(iter(queue)).external):
            waiter = next(iter(queue))
            queue.pop(waiter).cancel()
            self.active += 1
            waiter.admitted()

    def _expire(self, waiter: Waiter) -> None:
        if self._queue.pop(waiter, None) is not None:
            self.stats.downstream_cx_queue_timeout += 1
            waiter.finish("queue_timeout", abort=True)
