"""A TCP listener: one listening socket of a service port, served by ``asyncio.Server``.

It listens only while its service port has a usable endpoint (``lbd.net.listener``, kube-proxy's
REJECT by the kernel); a reload keeps an unchanged listener's socket and accept queue. It is
also what each connection it accepts sees of its listener (``ListenerView``).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Callable

from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route
from lbd.net.listener import ListenerSocket
from lbd.net.sockets import LISTEN_BACKLOG, bind_tcp_listener

# asyncio's accept loop (3.11) tries ``backlog`` accepts per wake-up and, at EMFILE, logs and
# schedules a 1 s retry for each of them instead of stopping: with a backlog of 4096 that is
# thousands of tracebacks and timers a second. So create_server gets a small batch, and the
# kernel backlog is set back with listen() once serving (uvloop accepts in libuv, unaffected).
ACCEPT_BATCH = 16
ProtocolFactory = Callable[["TcpListener"], asyncio.Protocol]


class TcpListener:
    __slots__ = (
        "_inherited",
        "_protocol",
        "_serving",
        "filtered",
        "loop",
        "removed",
        "server",
        "sock",
        "socket",
    )

    def __init__(
        self,
        address: str,
        port: int,
        route: Route,
        factory: ProtocolFactory,
        *,
        external: bool,
        filtered: bool,
        inherited: socket.socket | None = None,
        pinned: bool = False,
    ) -> None:
        """``factory(listener)`` makes the protocol of each accepted connection. ``inherited``:
        a listening socket bound elsewhere (a supervisor, the lbd this one took over from),
        used instead of binding. ``pinned``: never closed for lack of endpoints, because other
        processes listen on the same socket; connections are then reset one by one instead."""
        self.socket = ListenerSocket(self, "TCP", address, port, route, external, pinned=pinned)
        self.filtered = filtered  # loadBalancerSourceRanges apply (LoadBalancer IPs)
        self.removed = False  # closed by a reload: its connections drain
        # partial, not a method or lambda: no Python frame per accepted connection
        self._protocol = functools.partial(factory, self)
        self._inherited = inherited
        self.sock: socket.socket | None = None
        self.server: asyncio.Server | None = None
        self._serving: asyncio.Task[None] | None = None  # a re-bound socket on its way to serve
        self.loop: asyncio.AbstractEventLoop  # set by prepare; read by every connection

    @property
    def route(self) -> Route:
        return self.socket.route

    @property
    def external(self) -> bool:
        """Not a clusterIP listener: externalTrafficPolicy applies."""
        return self.socket.external

    @property
    def bound(self) -> tuple[str, int]:
        return self.socket.address, self.socket.port

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    async def prepare(self) -> None:
        self.loop = self.socket.loop = asyncio.get_running_loop()
        sock, self._inherited = self._inherited, None
        if sock is None:
            sock = bind_tcp_listener(self.socket.address, self.socket.port)
        self.socket.port = sock.getsockname()[1]
        self.sock = sock
        try:
            self.server = await self.loop.create_server(
                self._protocol, sock=sock, backlog=ACCEPT_BATCH, start_serving=False
            )
        except BaseException:
            self.sock = None
            sock.close()
            raise

    async def start(self) -> None:
        assert self.server is not None and self.sock is not None
        await self.server.start_serving()
        self.sock.listen(LISTEN_BACKLOG)  # start_serving listened with ACCEPT_BATCH
        self.socket.follow(self.route, self.external)

    def repoint(self, route: Route, external: bool, filtered: bool) -> None:
        self.filtered = filtered
        self.socket.follow(route, external)

    def close(self) -> None:
        self.removed = True
        self.socket.close()

    def check(self) -> None:
        self.socket.check()

    @property
    def destroyed(self) -> bool:
        sock = self.sock
        if self.server is None or sock is None:
            return False
        try:
            return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        except OSError:
            return True

    # -- SocketHandler: the ListenerSocket opens and shuts the socket --------------------------

    def pool_changed(self, pool: Pool) -> None:
        pass  # open connections keep their endpoints: a drained one ends by its own deadline

    def open(self) -> None:
        """Bind and listen now: from this moment the kernel completes connects into the accept
        queue; the event loop starts accepting from it a moment later (``_serve``)."""
        sock = bind_tcp_listener(self.socket.address, self.socket.port)
        self.sock = sock
        self._serving = self.loop.create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        try:
            self.server = await self.loop.create_server(
                self._protocol, sock=sock, backlog=ACCEPT_BATCH
            )
            sock.listen(LISTEN_BACKLOG)
        except OSError as error:  # not expected for a bound socket; never leave it half-open
            sock.close()
            self.sock = None
            self.socket.open_failed(error)
            return
        finally:
            self._serving = None
        if self.socket.closed or not self.route.pool.eligible(self.external):
            self.shut()

    def shut(self) -> None:
        if self.server is not None:
            self.server.close()  # closes the socket; open connections carry on
            self.server = None
            self.sock = None
        elif self.sock is not None and self._serving is None:
            self.sock.close()
            self.sock = None
        # else the _serve task owns the bound socket and shuts it itself once it has a server:
        # closing a socket under create_server would leave the loop watching a dead fd.
