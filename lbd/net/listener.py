"""What TCP and UDP listeners share: one small interface, and a socket that follows its pool.

kube-proxy REJECTs a service port with no usable endpoint: a TCP client's SYN gets a RST
(``connect()`` fails with ECONNREFUSED) and a UDP client gets ICMP port unreachable. A userspace
proxy gets the same answers from the kernel by not listening: while the route's pool has no
eligible endpoint for this listener's kind (none configured, none ready, none on this node under
a Local policy, none resolved yet), the socket is closed (with workers, shut down:
``lbd.net.tcp_listener``); when one returns, the same address
and port (port 0 resolved at the first bind) is bound and served again, synchronously inside the
pool change, so a reload that reports "applied" is already served.

``ListenerSocket`` holds that decision for either protocol: it watches the pool of the route the
listener serves (a reload may re-point it to another route), and asks its ``SocketHandler`` (the
TCP or UDP listener) to open or shut the socket. If the port was taken by someone else while it
was closed, re-binding is retried every second, logged and counted
(``lbd_listener_rebind_failures_total``). A socket destroyed from outside (``ss -K``, or any
error that closes a listening socket) is noticed by its handler at once (accept fails) and
bound again the same way (``destroyed``), logged and counted (``lbd_listener_destroyed_total``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Literal, Protocol

import structlog

from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route

log = structlog.get_logger("lbd.listener")

REBIND_RETRY_S = 1.0
ProtocolName = Literal["TCP", "UDP"]


class Listener(Protocol):
    """A listening socket of one service port, as the runtime drives it (TCP or UDP)."""

    @property
    def route(self) -> Route: ...

    @property
    def removed(self) -> bool:
        """Closed for good (a reload removed it, or shutdown): its connections drain."""
        ...

    @property
    def bound(self) -> tuple[str, int]:
        """(address, port), port 0 resolved once bound."""
        ...

    @property
    def sock(self) -> socket.socket | None:
        """Its socket; None while closed."""
        ...

    def sockets(self) -> list[socket.socket]:
        """The sockets it serves, as a seamless restart hands them over: its own first, then
        the further copies it accepts from (numbered by ``lbd.net.sockets.copy_key``)."""
        ...

    async def prepare(self) -> None:
        """Bind, not yet serving (reload phase 1); raises OSError and leaves nothing open."""
        ...

    async def start(self) -> None:
        """Serve, and follow the pool from now on."""
        ...

    def repoint(self, route: Route, external: bool, filtered: bool) -> None:
        """A reload gave the socket to another service port or listener kind."""
        ...

    def close(self) -> None:
        """Stop serving for good (open TCP connections carry on)."""
        ...


class SocketHandler(Protocol):
    """The protocol-specific half a ``ListenerSocket`` drives."""

    @property
    def is_open(self) -> bool:
        """A socket is bound (or on its way to being served)."""
        ...

    def open(self) -> None:
        """Bind and serve; raises OSError, and then nothing is left open."""
        ...

    def shut(self) -> None:
        """Stop serving and close the socket."""
        ...

    def pool_changed(self, pool: Pool) -> None:
        """After every change of the pool (UDP: sessions whose endpoint left end here)."""
        ...


class ListenerSocket:
    __slots__ = (
        "_retry",
        "_unwatch",
        "address",
        "closed",
        "external",
        "handler",
        "loop",
        "port",
        "protocol",
        "route",
    )

    def __init__(
        self,
        handler: SocketHandler,
        protocol: ProtocolName,
        address: str,
        port: int,
        route: Route,
        external: bool,
    ) -> None:
        self.handler = handler
        self.protocol = protocol
        self.address = address
        self.port = port  # 0 until the first bind resolves it; re-binds reuse it
        self.route = route
        self.external = external  # not a clusterIP listener: externalTrafficPolicy applies
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._unwatch: Callable[[], None] | None = None

    @property
    def label(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.protocol} {host}:{self.port}"

    def follow(self, route: Route, external: bool) -> None:
        """Serve ``route`` (a reload may just have changed it) and watch its pool, and no
        longer the one watched before; act on the pool as it is now."""
        self._unfollow()
        self.route = route
        self.external = external
        self._unwatch = route.pool.watch(self._pool_changed)
        self._pool_changed(route.pool)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._unfollow()
        self._stop()

    def destroyed(self) -> None:
        """The handler found its socket destroyed from outside (its accept fails): shut it
        and serve again, logged and counted. Left alone, the kernel would report it readable
        for ever, and every accept would fail."""
        if self.closed:
            return
        counts = self.route.stats.listener_destroyed_total
        setattr(counts, self.protocol, getattr(counts, self.protocol) + 1)
        log.warning("listener socket destroyed, binding it again", listener=self.label)
        self._stop()
        self._pool_changed(self.route.pool)  # serve again, if it should listen at all

    def _unfollow(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    def _pool_changed(self, pool: Pool) -> None:
        if self.closed:
            return
        self.handler.pool_changed(pool)
        if not pool.eligible(self.external):
            if self.handler.is_open:
                log.info(
                    "listener closed: no usable endpoint, the kernel refuses for lbd",
                    listener=self.label,
                    route=self.route.label,
                )
            self._stop()
        elif not self.handler.is_open and self._retry is None:
            self._open()

    def _open(self) -> None:
        self._retry = None
        if self.closed or self.handler.is_open or not self.route.pool.eligible(self.external):
            return
        try:
            self.handler.open()
        except OSError as error:
            self._failed("re-bind", error)
            return
        log.info("listener open", listener=self.label, route=self.route.label)

    def _failed(self, what: str, error: OSError) -> None:
        """Someone else took the port while it was closed: keep trying, say so, count it."""
        counts = self.route.stats.listener_rebind_failures_total
        setattr(counts, self.protocol, getattr(counts, self.protocol) + 1)
        log.warning(
            f"listener {what} failed",
            listener=self.label,
            route=self.route.label,
            error=error.strerror or str(error),
        )
        loop = self.loop or asyncio.get_running_loop()
        self._retry = loop.call_later(REBIND_RETRY_S, self._open)

    def _stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.handler.shut()
