"""One epoll set per event loop for the sockets of proxied TCP connections.

The event loop's own machinery costs too much per connection: a uvloop transport sets
TCP_NODELAY and asks getsockname and getpeername, and a socket given to ``add_reader`` costs
libuv an ioctl and two probing epoll_ctl calls before it is even watched. Here the sockets of
every connection (and the listening sockets) share one epoll set that the loop watches as a
single descriptor: a socket costs one ``epoll_ctl`` when it arrives and nothing when it closes
(the kernel drops a closed descriptor from the set), and one loop wakeup serves the ready
sockets of many connections.

Connection sockets are edge-triggered for reading and writing from the start, so their
registration never changes: a handler reads until a short read or EAGAIN, and remembers what
it left unread (the destination was full) to read it when the destination drains. Listening
sockets are level-triggered. Sockets are closed through ``close``: during a dispatch the
descriptor stays open until the batch ends, so its number cannot be reused by a socket
accepted in the same batch and meet a stale event meant for the closed one.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import Protocol

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
# Readable, hung up or failed: a read tells which (data, EOF or the error).
READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# The peer hung up or failed: an EOF or error may wait behind data (read until EAGAIN).
HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
EDGE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
LEVEL = select.EPOLLIN
MAX_EVENTS = 256  # per wakeup; the rest come at the next one
Handler = Callable[[int], None]


class Closable(Protocol):
    """What ``Reactor.close`` closes (a socket)."""

    def close(self) -> None: ...

    def fileno(self) -> int: ...


class Reactor:
    __slots__ = ("_closing", "_epoll", "_handlers", "_loop", "dispatching")

    _by_loop: dict[asyncio.AbstractEventLoop, Reactor] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._closing: list[Closable] = []
        self.dispatching = False
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Reactor:
        """The reactor of ``loop``: made on first use, closed again once it watches nothing
        (so a loop never closes with it still registered)."""
        reactor = cls._by_loop.get(loop)
        if reactor is None or reactor.closed:
            reactor = cls._by_loop[loop] = cls(loop)
        return reactor

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def _close_if_idle(self) -> None:
        if not self._handlers and not self.dispatching and not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            if self._by_loop.get(self._loop) is self:
                del self._by_loop[self._loop]

    def __len__(self) -> int:
        return len(self._handlers)

    def add(self, fd: int, handler: Handler, mask: int = EDGE) -> None:
        """Watch ``fd``; ``handler(events)`` is called with each epoll event mask."""
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def retarget(self, fd: int, handler: Handler) -> None:
        """Call ``handler`` for ``fd``'s events from now on (no system call)."""
        self._handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``, which stays open (a listening socket handed on)."""
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)
            self._close_if_idle()

    def close(self, sock: Closable) -> None:
        """Forget ``sock``'s handler and close it: now, or after the batch being dispatched."""
        self._handlers.pop(sock.fileno(), None)
        if self.dispatching:
            self._closing.append(sock)
        else:
            sock.close()
            self._close_if_idle()

    def _dispatch(self) -> None:
        handlers = self._handlers
        self.dispatching = True
        try:
            for fd, events in self._epoll.poll(0, MAX_EVENTS):
                handler = handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(events)
                except Exception as error:  # one connection's bug must not lose the batch
                    self._loop.call_exception_handler(
                        {"message": "reactor handler failed", "exception": error}
                    )
        finally:
            self.dispatching = False
            closing = self._closing
            if closing:
                for sock in closing:
                    sock.close()
                closing.clear()
                self._close_if_idle()
