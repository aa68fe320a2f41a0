"""UDP sessions that outlive the reading of their listener: the old lbd of a seamless restart.

Once a successor serves a UDP listening socket (``lbd.process.handoff``), every datagram a client
sends is read by the successor. The old lbd's sessions still have replies on their way from
their endpoints: those arrive on the sessions' own upstream sockets, which only the old lbd
holds, and leave through its copy of the listening socket, from the address the client sent to.
So the sessions live on here, without their listener, and end as they would have: after
``udpIdleTimeout`` without a datagram either way; what is left at the route's ``drainTimeout``
ends then. The copy of the listening socket closes with the last session (the successor's copy
stays open, with its queue).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Protocol

from lbd.endpoints.route import Route
from lbd.net.idle import IdleWheel
from lbd.net.reactor import Reactor
from lbd.net.udp_session import UdpSession


class Drained(Protocol):
    """What a drain takes over from the listener it came from."""

    loop: asyncio.AbstractEventLoop
    reactor: Reactor  # the sessions' sockets stay watched there
    idle: IdleWheel  # their idle deadlines stay filed there
    view: memoryview

    @property
    def route(self) -> Route: ...


class UdpDrain:
    """The sessions of one handed-over UDP listener (a ``SessionOwner`` for them)."""

    __slots__ = (
        "_deadline",
        "_done",
        "_route",
        "_timer",
        "idle",
        "loop",
        "reactor",
        "sessions",
        "sock",
        "view",
    )

    def __init__(
        self, listener: Drained, sock: socket.socket, sessions: dict[object, UdpSession]
    ) -> None:
        """``sock``: the listener's socket, no longer read here."""
        self.loop = loop = listener.loop
        self.reactor = listener.reactor
        self.idle = listener.idle
        self.sock: socket.socket | None = sock  # replies leave through it
        self.view = listener.view
        self._route = route = listener.route
        self.sessions = sessions
        for session in sessions.values():
            session.listener = self
        self._done = asyncio.Event()
        self._deadline = loop.time() + route.tunables.drain_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._check()

    @property
    def route(self) -> Route:
        return self._route

    async def wait(self) -> None:
        """Until the last session has ended (and the socket closed)."""
        await self._done.wait()

    def _check(self) -> None:
        """End the idle sessions; look again when the next could be idle, or at the deadline."""
        now = self.loop.time()
        if now >= self._deadline:
            self.close()
            return
        idle = self._route.tunables.udp_idle_timeout
        latest = now
        for session in list(self.sessions.values()):
            expires = session.last_activity + idle
            if expires <= now:
                self._route.stats.udp_sess_ended_total.idle_timeout += 1
                session.finish("idle_timeout")
            else:
                latest = max(latest, expires)
        if not self.sessions:
            self.close()
            return
        self._timer = self.loop.call_at(min(latest, self._deadline), self._check)

    def close(self) -> None:
        """End what is left now (the drain's deadline, or the process's second signal)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for session in list(self.sessions.values()):
            session.finish("shutdown")
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._done.set()
