"""A TCP listener: one listening socket of a service port, accepted from in the worker's
``Reactor`` (one epoll set with the connections' sockets).

It listens only while its service port has a usable endpoint (``lbd.net.listener``, kube-proxy's
REJECT by the kernel); a reload keeps an unchanged listener's socket and accept queue. It is
also what each connection it accepts sees of its listener (``ListenerView``). Each wakeup
accepts a batch (``ACCEPT_BATCH``, or until the queue is empty); accepted sockets inherit
TCP_NODELAY from the listening socket, so they cost no system call but the accept itself.
Out of descriptors (EMFILE), accepting pauses for ``ACCEPT_PAUSE_S``: no spinning on a queue
that cannot be taken from, one log line a second, and each pause counted.
"""

from __future__ import annotations

import _socket
import asyncio
import socket
from collections.abc import Callable

import structlog

from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route
from lbd.net.connect import OUT_OF_DESCRIPTORS
from lbd.net.listener import ListenerSocket
from lbd.net.reactor import LEVEL, Reactor
from lbd.net.sockets import bind_tcp_listener

log = structlog.get_logger("lbd.tcp")

ACCEPT_BATCH = 64
ACCEPT_PAUSE_S = 0.01
Peer = tuple[str, int] | tuple[str, int, int, int]
ConnectionFactory = Callable[["TcpListener", _socket.socket, Peer], object]


class TcpListener:
    __slots__ = (
        "_factory",
        "_inherited",
        "_paused",
        "filtered",
        "loop",
        "reactor",
        "removed",
        "sock",
        "socket",
    )

    def __init__(
        self,
        address: str,
        port: int,
        route: Route,
        factory: ConnectionFactory,
        *,
        external: bool,
        filtered: bool,
        inherited: socket.socket | None = None,
        pinned: bool = False,
    ) -> None:
        """``factory(listener, sock, peer)`` makes each accepted connection. ``inherited``:
        a listening socket bound elsewhere (a supervisor, the lbd this one took over from),
        used instead of binding. ``pinned``: never closed for lack of endpoints, because other
        processes listen on the same socket; connections are then reset one by one instead."""
        self.socket = ListenerSocket(self, "TCP", address, port, route, external, pinned=pinned)
        self.filtered = filtered  # loadBalancerSourceRanges apply (LoadBalancer IPs)
        self.removed = False  # closed by a reload: its connections drain
        self._factory = factory
        self._inherited = inherited
        self.sock: socket.socket | None = None
        self._paused: asyncio.TimerHandle | None = None  # accepting paused (out of descriptors)
        self.loop: asyncio.AbstractEventLoop  # set by prepare; read by every connection
        self.reactor: Reactor

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
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # for accepted sockets
        self.socket.port = sock.getsockname()[1]
        self.sock = sock

    async def start(self) -> None:
        assert self.sock is not None
        self._watch(self.sock)
        self.socket.follow(self.route, self.external)

    def repoint(self, route: Route, external: bool, filtered: bool) -> None:
        self.filtered = filtered
        self.socket.follow(route, external)

    def close(self) -> None:
        self.removed = True
        self.socket.close()

    # -- SocketHandler: the ListenerSocket opens and shuts the socket --------------------------

    def pool_changed(self, pool: Pool) -> None:
        pass  # open connections keep their endpoints: a drained one ends by its own deadline

    def open(self) -> None:
        """Bind, listen and accept, all before this returns."""
        sock = bind_tcp_listener(self.socket.address, self.socket.port)
        self.sock = sock
        self._watch(sock)

    def _watch(self, sock: socket.socket) -> None:
        # The loop's reactor closes while it watches nothing: ask for it each time.
        self.reactor = Reactor.of(self.loop)
        self.reactor.add(sock.fileno(), self._on_accept, LEVEL)

    def shut(self) -> None:
        sock = self.sock
        if sock is not None:
            self.sock = None
            self.reactor.remove(sock.fileno())  # explicitly: other processes may hold it too
            sock.close()  # open connections carry on
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None

    # -- accepting -------------------------------------------------------------------------------

    def _on_accept(self, events: int) -> None:
        sock = self.sock
        if sock is None:
            return
        family = int(sock.family)  # socket.socket's is an enum made per call
        factory = self._factory
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = sock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in OUT_OF_DESCRIPTORS:
                    self._pause(error)
                    return
                continue  # the client gave up while queued (ECONNABORTED...): next one
            factory(self, _socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd), peer)

    def _pause(self, error: OSError) -> None:
        """No descriptor for a connection: leave the queue alone for a moment."""
        sock = self.sock
        assert sock is not None
        self.reactor.modify(sock.fileno(), 0)
        self._paused = self.loop.call_later(ACCEPT_PAUSE_S, self._resume)
        route = self.route
        route.stats.downstream_cx_refused_total.fd_exhausted += 1
        now = self.loop.time()
        if now - route.fd_exhausted_logged_at >= 1.0:  # at most one line a second
            route.fd_exhausted_logged_at = now
            log.error(
                "out of file descriptors",
                where="accept",
                route=route.label,
                error=error.strerror or str(error),
            )

    def _resume(self) -> None:
        self._paused = None
        if self.sock is not None:
            self.reactor.modify(self.sock.fileno(), LEVEL)
