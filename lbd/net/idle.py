"""Idle deadlines of many connections behind one timer.

A TimerHandle per connection costs ~600 bytes (the Python handle and uvloop's libuv timer) for
the whole life of the connection, and an allocation plus a timer-heap insert and removal per
connection. Here a connection is one entry in the set of its deadline's bucket (``TICK``
seconds wide), and one loop timer serves the earliest bucket. A deadline fires up to ``TICK``
late, never early; a connection that was active meanwhile is simply filed under its new
deadline, so it is looked at about once per idleTimeout, not once per byte or per tick.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Protocol

TICK = 0.25  # seconds: the precision of idle timeouts


class Idler(Protocol):
    # The bucket the connection is filed under (None: none). The bucket itself, not its tick:
    # a tick is an int past 256, a 28-byte object per connection; the set is shared.
    idle_bucket: set[Idler] | None

    def check_idle(self) -> None:
        """The deadline it was filed under has passed: close, or file again."""
        ...


class IdleWheel:
    __slots__ = ("_armed", "_buckets", "_loop", "_ticks", "_timer", "tick")

    def __init__(self, tick: float = TICK) -> None:
        self.tick = tick  # seconds: how late a deadline may fire
        self._buckets: dict[int, set[Idler]] = {}
        self._ticks: list[int] = []  # heap of the buckets' ticks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed = -1  # the tick the timer is set for

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def file(self, connection: Idler, deadline: float) -> None:
        """Call ``connection.check_idle()`` at ``deadline`` (loop time), or up to TICK later."""
        self.remove(connection)
        tick = math.ceil(deadline / self.tick)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
        bucket.add(connection)
        connection.idle_bucket = bucket
        if self._timer is None or tick < self._armed:
            self._arm(tick)

    def remove(self, connection: Idler) -> None:
        bucket = connection.idle_bucket
        if bucket is not None:
            bucket.discard(connection)  # a fired bucket is already out of ``_buckets``
            connection.idle_bucket = None

    def _arm(self, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._armed = tick
        self._timer = self._loop.call_at(tick * self.tick, self._fire)

    def _fire(self) -> None:
        self._timer = None
        assert self._loop is not None
        due = math.floor(self._loop.time() / self.tick)
        ticks = self._ticks
        while ticks and ticks[0] <= due:
            tick = heapq.heappop(ticks)
            for connection in self._buckets.pop(tick, ()):
                connection.idle_bucket = None
                connection.check_idle()  # may file it again, in a later bucket
        if ticks:
            self._arm(ticks[0])
