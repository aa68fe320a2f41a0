"""What TCP and UDP listeners share: one small interface, and a socket that follows its pool.

kube-proxy REJECTs a service port with no usable endpoint: a TCP client's SYN gets a RST
(``connect()`` fails with ECONNREFUSED) and a UDP client gets ICMP port unreachable. A userspace
proxy gets the same answers from the kernel by not listening: while the route's pool has no
eligible endpoint for this listener's kind (none configured, none ready, none on this node under
a Local policy, none resolved yet), the socket is closed; when one returns, the same address
and port (port 0 resolved at the first bind) is bound and served again, synchronously inside the
pool change, so a reload that reports "applied" is already served.

``ListenerSocket`` holds that decision for either protocol: it watches the pool of the route the
listener serves (a reload may re-point it to another route), and asks its ``SocketHandler`` (the
TCP or UDP listener) to open or shut the socket. If the port was taken by someone else while it
was closed, re-binding is retried every second, logged and counted
(``lbd_listener_rebind_failures_total``). A listener whose socket other processes share
(``pinned``: workers, a seamless restart) never closes it for lack of endpoints.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable
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
        """The socket a seamless restart hands over (TCP only); None while closed."""
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

    def check(self) -> None:
        """Find out whether the socket was destroyed from outside, and bind it again if so."""
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

    @property
    def destroyed(self) -> bool:
        """The open socket no longer works: destroyed from outside (``ss -K``), or failed."""
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
        "pinned",
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
        *,
        pinned: bool = False,
    ) -> None:
        self.handler = handler
        self.protocol = protocol
        self.address = address
        self.port = port  # 0 until the first bind resolves it; re-binds reuse it
        self.route = route
        self.external = external  # not a clusterIP listener: externalTrafficPolicy applies
        self.pinned = pinned
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

    def check(self) -> None:
        """A socket destroyed from outside (``ss -K``, or any error that closes it) is shut
        and bound again, logged and counted. Left alone, the event loop would spin on it: the
        kernel reports it readable for ever and every accept fails."""
        if self.closed or not self.handler.destroyed:
            return
        counts = self.route.stats.listener_destroyed_total
        setattr(counts, self.protocol, getattr(counts, self.protocol) + 1)
        log.warning("listener socket destroyed, binding it again", listener=self.label)
        self._stop()
        if not self.pinned:
            self._pool_changed(self.route.pool)  # bind again, if it should listen at all

    def open_failed(self, error: OSError) -> None:
        """The handler could not serve a socket it had bound (TCP: create_server failed)."""
        self._failed("serve", error)

    def _unfollow(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    def _pool_changed(self, pool: Pool) -> None:
        if self.closed:
            return
        self.handler.pool_changed(pool)
        if self.pinned:
            return
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
        """Someone else took the port while it was closed (or serving failed): keep trying,
        say so, count it."""
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


CHECK_INTERVAL_S = 1.0


class ListenerCheck:
    """Checks every listener once a second (``Listener.check``): a listening socket destroyed
    from outside gives no event a listener could wait on (uvloop retries the failing accept
    silently, spinning a core), so it is looked for. One getsockopt per TCP listener."""

    def __init__(self, listeners: Callable[[], Iterable[Listener]]) -> None:
        self.listeners = listeners
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(CHECK_INTERVAL_S, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        for listener in list(self.listeners()):
            listener.check()
        self.start()
