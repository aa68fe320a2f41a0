"""A TCP listener that listens only while its service port has a usable endpoint.

kube-proxy REJECTs a service port with no usable endpoint: the client's SYN is answered with a
RST, so ``connect()`` fails with ECONNREFUSED; the client never sees an accepted connection that
is then reset. A userspace proxy gets the same answer from the kernel by not listening: while
the pool has no eligible endpoint for this listener's kind (none configured, none ready, none on
this node under a Local policy, none resolved yet), the socket is closed; when one returns the
same address and port (port 0 resolved at the first bind) is bound and served again.

A reload keeps an unchanged listener (socket and accept queue) as before: closing happens only
while there is nothing to accept for. If the port is taken by someone else while it was closed,
re-binding is retried every second, logged and counted (``listener_rebind_failures_total.TCP``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import structlog

from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route
from lbd.net.follow import PoolFollower
from lbd.net.sockets import LISTEN_BACKLOG, bind_tcp_listener

log = structlog.get_logger("lbd.tcp")

REBIND_RETRY_S = 1.0
# asyncio's accept loop (3.11) tries ``backlog`` accepts per wake-up and, at EMFILE, logs and
# schedules a 1 s retry for each of them instead of stopping: with a backlog of 4096 that is
# thousands of tracebacks and timers a second. So create_server gets a small batch, and the
# kernel backlog is set back with listen() once serving (uvloop accepts in libuv, unaffected).
ACCEPT_BATCH = 16
ProtocolFactory = Callable[[], asyncio.Protocol]


class TcpListener(PoolFollower):
    __slots__ = (
        "_factory",
        "_inherited",
        "_loop",
        "_reopen",
        "address",
        "closed",
        "external",
        "pinned",
        "port",
        "route",
        "server",
        "sock",
    )

    def __init__(
        self,
        address: str,
        port: int,
        route: Route,
        external: bool,
        factory: ProtocolFactory,
        *,
        inherited: socket.socket | None = None,
        pinned: bool = False,
    ) -> None:
        """``inherited``: a listening socket bound elsewhere (a supervisor, the lbd this one
        took over from), used instead of binding. ``pinned``: never closed for lack of
        endpoints, because other processes listen on the same socket; connections are then
        reset one by one instead (Downstream), as before REJECT-by-closing."""
        self._inherited = inherited
        self.pinned = pinned
        self.address = address
        self.port = port  # 0 until the first bind resolves it; re-binds reuse it
        self.route = route
        self.external = external  # not a clusterIP listener: externalTrafficPolicy applies
        self._factory = factory
        self.sock: socket.socket | None = None
        self.server: asyncio.Server | None = None
        self._reopen: asyncio.Task[None] | asyncio.TimerHandle | None = None
        self._unwatch = None  # lbd.net.follow
        self.closed = False

    @property
    def bound(self) -> tuple[str, int]:
        return self.address, self.port

    @property
    def listening(self) -> bool:
        return self.server is not None

    async def prepare(self) -> None:
        """Bind (raises OSError) and create the server, not yet accepting (reload phase 1)."""
        self._loop = asyncio.get_running_loop()
        await self._open()

    async def start(self) -> None:
        """Accept, and follow the pool from now on; with no usable endpoint, stop at once."""
        assert self.server is not None and self.sock is not None
        await self.server.start_serving()
        self.sock.listen(LISTEN_BACKLOG)  # start_serving listened with ACCEPT_BATCH
        self._follow()
        self._pool_changed(self.route.pool)

    def repoint(self, route: Route, external: bool) -> None:
        self.external = external
        self.route = route
        self._follow()
        self._pool_changed(route.pool)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._unfollow()
        self._shut()

    # -- the socket follows the pool ---------------------------------------------------------

    async def _open(self) -> None:
        sock, self._inherited = self._inherited, None
        if sock is None:
            sock = bind_tcp_listener(self.address, self.port)
        self.port = sock.getsockname()[1]
        self.sock = sock
        try:
            self.server = await self._loop.create_server(
                self._factory, sock=sock, backlog=ACCEPT_BATCH, start_serving=False
            )
        except BaseException:
            self.sock = None
            sock.close()
            raise

    def _shut(self) -> None:
        if isinstance(self._reopen, asyncio.TimerHandle):
            self._reopen.cancel()
            self._reopen = None
        if self.server is not None:
            self.server.close()  # closes the socket; open connections carry on
            self.server = None
            self.sock = None
        elif self.sock is not None and self._reopen is None:
            self.sock.close()
            self.sock = None
        # else a _serve task owns the bound socket and shuts it itself once it has a server:
        # closing a socket under create_server would leave the loop watching a dead fd.

    def _pool_changed(self, pool: Pool) -> None:
        if self.closed or self.pinned:
            return
        if not pool.eligible(self.external):
            if self.server is not None:
                log.info(
                    "tcp listener closed: no usable endpoint, connects are refused",
                    listener=f"{self.address}:{self.port}",
                    route=self.route.label,
                )
            self._shut()
        elif self.sock is None and self._reopen is None:
            self._rebind()

    def _rebind(self) -> None:
        """Bind and listen now, inside the pool change: from this moment the kernel completes
        connects into the accept queue, so a reload that reports "applied" is already served.
        The event loop starts accepting from the queue a moment later (``_serve``)."""
        self._reopen = None
        if self.closed or self.sock is not None or not self.route.pool.eligible(self.external):
            return
        try:
            sock = bind_tcp_listener(self.address, self.port)
        except OSError as error:
            self.route.stats.listener_rebind_failures_total.TCP += 1
            log.warning(
                "tcp listener re-bind failed",
                listener=f"{self.address}:{self.port}",
                route=self.route.label,
                error=error.strerror or str(error),
            )
            self._reopen = self._loop.call_later(REBIND_RETRY_S, self._rebind)
            return
        self.sock = sock
        self._reopen = self._loop.create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        try:
            self.server = await self._loop.create_server(
                self._factory, sock=sock, backlog=ACCEPT_BATCH
            )
            sock.listen(LISTEN_BACKLOG)
        except OSError as error:  # not expected for a bound socket; never leave it half-open
            self.route.stats.listener_rebind_failures_total.TCP += 1
            log.warning(
                "tcp listener serve failed",
                listener=f"{self.address}:{self.port}",
                route=self.route.label,
                error=error.strerror or str(error),
            )
            sock.close()
            self.sock = None
            self._reopen = self._loop.call_later(REBIND_RETRY_S, self._rebind)
            return
        finally:
            if self._reopen is asyncio.current_task():
                self._reopen = None
        log.info(
            "tcp listener open", listener=f"{self.address}:{self.port}", route=self.route.label
        )
        if self.closed or not self.route.pool.eligible(self.external):
            self._shut()
