"""The live connections of one worker, so shutdown and reload can wait for (or end) them.

Python 3.11's ``Server.wait_closed()`` does not wait for open connections, so we track them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from lbd.net.idle import IdleWheel


class Closable(Protocol):
    def finish(self, reason: str, *, abort: bool = False) -> None: ...


T = TypeVar("T", bound=Closable)


class ConnectionSet(Generic[T]):
    __slots__ = ("_empty", "_items", "idle")

    def __init__(self) -> None:
        self._items: set[T] = set()
        self._empty: asyncio.Event | None = None
        self.idle = IdleWheel()  # the idle deadlines of these connections, one timer for all

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
