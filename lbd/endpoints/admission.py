"""Connection limits of one service port: HAProxy's maxconn + queue.

A new connection is admitted when the port is under ``maxConnections`` and some eligible
endpoint is under ``maxConnectionsPerEndpoint``; otherwise it waits (reading paused) in a
bounded FIFO queue for up to ``queueTimeout`` and is admitted when a connection ends, or is
refused (reset) and counted. A full queue refuses at once. The queue is an insertion-ordered
dict, so a queued client that gives up leaves it in O(1).

With several workers the limits are global: the admitted count lives in a shared slot of the
supervisor's counters region (``lbd.shm.counts``), as the endpoints' active counts do, and each
worker keeps its own queue. A slot freed in another worker sends no event here, so while this
worker's queue is not empty it looks again every ``CROSS_WORKER_RECHECK`` seconds.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from lbd.config.model import Tunables

if TYPE_CHECKING:
    from lbd.endpoints.pool import Pool
    from lbd.observability.stats import RouteStats
    from lbd.shm.counts import SharedCounts

CROSS_WORKER_RECHECK = 0.02


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
    __slots__ = ("_queue", "_recheck", "active", "pool", "shared", "slot", "stats", "tunables")

    def __init__(self, tunables: Tunables, pool: Pool, stats: RouteStats) -> None:
        self.tunables = tunables  # the limits: max_connections[_per_endpoint], max_queue...
        self.pool = pool
        self.stats = stats
        self.active = 0  # this worker's connections holding a slot (connecting or connected)
        self._queue: dict[Waiter, asyncio.TimerHandle] = {}
        self._recheck: asyncio.TimerHandle | None = None
        # Several workers: the admitted count of every worker, in one shared cell per worker.
        self.shared: SharedCounts | None = None
        self.slot = -1
        slots = pool.slots
        if slots is not None:
            self.slot = slots.admission_slot(pool.route_key)
            if self.slot >= 0:
                self.shared = slots.counts

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def admitted(self) -> int:
        """Connections holding a slot, in every worker."""
        shared = self.shared
        return self.active if shared is None else shared.total(self.slot)

    def has_room(self, external: bool) -> bool:
        tunables = self.tunables
        limit = tunables.max_connections
        if limit is not None and self.admitted >= limit:
            return False
        per_endpoint = tunables.max_connections_per_endpoint
        if per_endpoint is not None:
            return any(m.active < per_endpoint for m in self.pool.eligible(external))
        return True

    def adopt(self) -> None:
        """A connection opened before this port had limits (a reload turned them on) holds a
        slot from now on, so it counts against maxConnections and frees the slot as it ends."""
        self._take()

    def _take(self) -> None:
        self.active += 1
        if self.shared is not None:
            self.shared.add(self.slot, 1)

    def request(self, waiter: Waiter) -> bool | None:
        """True: admitted now. None: queued (``waiter.admitted()`` or ``finish`` follows).
        False: refused, the queue is full (counted)."""
        if not self._queue and self.has_room(waiter.external):
            self._take()
            return True
        if len(self._queue) >= self.tunables.max_queue:
            self.stats.downstream_cx_refused_total.overflow += 1
            return False
        loop = asyncio.get_running_loop()
        self._queue[waiter] = loop.call_later(self.tunables.queue_timeout, self._expire, waiter)
        self.stats.downstream_cx_queued_total += 1
        if self.pool.slots is not None and self._recheck is None:
            self._recheck = loop.call_later(CROSS_WORKER_RECHECK, self._look_again)
        return None

    def leave(self, waiter: Waiter) -> None:
        """A queued connection ended on its own (the client went away)."""
        timer = self._queue.pop(waiter, None)
        if timer is not None:
            timer.cancel()

    def quit(self, waiter: Waiter, queued: bool) -> None:
        """A connection holding a slot (or waiting for one, ``queued``) ended."""
        if queued:
            self.leave(waiter)
        else:
            self.release()

    def release(self) -> None:
        """An admitted connection ended: its slot goes to the head of the queue."""
        self.active -= 1
        if self.shared is not None:
            self.shared.add(self.slot, -1)
        self.wake()

    def wake(self) -> None:
        """Admit queued connections while there is room (after a release or a reload)."""
        queue = self._queue
        while queue and self.has_room(next(iter(queue)).external):
            waiter = next(iter(queue))
            queue.pop(waiter).cancel()
            self._take()
            waiter.admitted()

    def _look_again(self) -> None:
        """Another worker may have freed a slot (or an endpoint's) since the last look."""
        self._recheck = None
        self.wake()
        if self._queue:
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(CROSS_WORKER_RECHECK, self._look_again)

    def _expire(self, waiter: Waiter) -> None:
        if self._queue.pop(waiter, None) is not None:
            self.stats.downstream_cx_refused_total.queue_timeout += 1
            waiter.finish("queue_timeout", abort=True)
