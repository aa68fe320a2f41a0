"""kube-proxy's BoundedFrequencyRunner for one coroutine function: bursts of requests coalesce,
runs are at least ``min_interval`` apart (start to start), and a request never waits longer than
``min_interval`` (plus the run in progress) for the run that covers it.

The first request after a quiet spell runs at once; requests that arrive while a run is due or
in progress are all served by the next run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class BoundedRunner:
    __slots__ = ("_last", "_wanted", "function", "min_interval", "runs")

    def __init__(self, function: Callable[[], Awaitable[object]], min_interval: float) -> None:
        self.function = function
        self.min_interval = min_interval
        self.runs = 0
        self._wanted = asyncio.Event()
        self._last = float("-inf")  # loop time the last run started

    def request(self) -> None:
        """Ask for a run (cheap; call it for every event)."""
        self._wanted.set()

    async def run(self) -> None:
        """Serve requests until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wanted.wait()
            wait = self._last + self.min_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # coalesce: what arrives meanwhile joins this run
            self._wanted.clear()
            self._last = loop.time()
            self.runs += 1
            await self.function()
