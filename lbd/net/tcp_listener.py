"""A TCP listener: one listening socket of a service port, accepted from in the worker's
``Reactor`` (one epoll set with the connections' sockets).

It listens only while its service port has a usable endpoint (``lbd.net.listener``, kube-proxy's
REJECT by the kernel); a reload keeps an unchanged listener's socket and accept queue. It is
also what each connection it accepts sees of its listener (``ListenerView``). Each wakeup
accepts a batch (``ACCEPT_BATCH``, or until the queue is empty); accepted sockets inherit
TCP_NODELAY from the listening socket, so they cost no system call but the accept itself.
Out of descriptors (EMFILE), the listener frees a descriptor it keeps spare for the purpose and
takes the queued connections only to reset them, as libev's and Node's servers do: each client
fails at once instead of hanging in the queue until its own timeout, each one is counted
(``fd_exhausted``), and nothing spins (the queue is empty afterwards). Without a spare (it could
not be taken back), accepting pauses for ``ACCEPT_PAUSE_S`` instead. A socket that is no
longer listening (``ss -K`` destroyed it: accept fails with EINVAL) leaves the reactor at once
and is served again (``ListenerSocket.destroyed``): bound anew, or with workers listened on
again, which heals the copy the supervisor keeps too (it is the same socket).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import errno
import functools
import socket
from collections.abc import Callable, Sequence

import structlog

from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route
from lbd.net.descriptors import (
    OUT_OF_DESCRIPTORS,
    SHEDDABLE,
    SpareDescriptor,
    out_of_descriptors,
)
from lbd.net.listener import ListenerSocket
from lbd.net.reactor import LEVEL, Reactor
from lbd.net.sockets import bind_tcp_listener, listen_again
from lbd.net.tcp_socket import set_reset

log = structlog.get_logger("lbd.tcp")

ACCEPT_BATCH = 64
ACCEPT_PAUSE_S = 0.01
_GAVE_UP = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
Peer = tuple[str, int] | tuple[str, int, int, int]
ConnectionFactory = Callable[["TcpListener", _socket.socket, Peer], object]


class TcpListener:
    __slots__ = (
        "_factory",
        "_inherited",
        "_paused",
        "_resting",
        "_watching",
        "copies",
        "filtered",
        "loop",
        "reactor",
        "removed",
        "shared",
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
        copies: Sequence[socket.socket] = (),
        shared: bool = False,
    ) -> None:
        """``factory(listener, sock, peer)`` makes each accepted connection. ``inherited``:
        a listening socket bound elsewhere (a supervisor, the lbd this one took over from),
        used instead of binding; ``copies``: more SO_REUSEPORT copies of it to accept from
        too (adopted from a predecessor that had more workers). ``shared``: other processes
        hold these sockets (workers), so without endpoints the listener stops listening by
        ``shutdown()`` (closing would leave the others' descriptors listening) and listens
        again with ``listen()`` on the same sockets."""
        self.socket = ListenerSocket(self, "TCP", address, port, route, external)
        self.shared = shared
        self.copies = list(copies)
        self._resting: list[socket.socket] = []  # shared sockets shut for lack of endpoints
        self._watching = False  # the sockets are in the reactor (from start on)
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
            for inherited in (sock, *self.copies):
                # A worker before us may have shut it for lack of endpoints, or it was
                # destroyed meanwhile: listen again. TCP_NODELAY: for the accepted.
                listen_again(inherited)
                inherited.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.port = sock.getsockname()[1]
        self.sock = sock

    async def start(self) -> None:
        assert self.sock is not None
        SpareDescriptor.keep()
        self._watch()
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
        """Listen and accept, all before this returns: on the shared sockets shut before,
        else on a socket bound anew."""
        if self._resting:
            for sock in self._resting:
                listen_again(sock)  # raises: kept for the next try
            (self.sock, *self.copies), self._resting = self._resting, []
        else:
            self.sock = bind_tcp_listener(self.socket.address, self.socket.port)
        self._watch()

    def _watch(self) -> None:
        # The loop's reactor closes while it watches nothing: ask for it each time.
        self.reactor = reactor = Reactor.of(self.loop)
        self._watching = True
        for sock in self.sockets():
            reactor.add(sock.fileno(), functools.partial(self._on_accept, sock), LEVEL)

    def sockets(self) -> list[socket.socket]:
        return [] if self.sock is None else [self.sock, *self.copies]

    def shut(self) -> None:
        """Stop accepting (open connections carry on). For good (the listener is closed):
        close the descriptors. For lack of endpoints: close them, or, when other processes
        hold them, shutdown() them (the kernel then refuses) and keep them to listen again."""
        socks = self.sockets()
        self.sock = None
        self.copies = []
        resting = self.shared and not self.socket.closed
        watching, self._watching = self._watching, False  # not yet when prepare's bind fails
        for sock in socks:
            if watching:
                self.reactor.remove(sock.fileno())  # explicitly: other processes hold it too
            if resting:
                with contextlib.suppress(OSError):  # already shut by another worker
                    sock.shutdown(socket.SHUT_RDWR)
                self._resting.append(sock)
            else:
                sock.close()
        if self.socket.closed:
            for sock in self._resting:
                sock.close()
            self._resting = []
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None

    # -- accepting -------------------------------------------------------------------------------

    def _on_accept(self, sock: socket.socket, events: int) -> None:
        if self.sock is None:
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
                    if error.errno not in SHEDDABLE or not self._shed(sock, family, error):
                        self._pause(error)
                    return
                if error.errno in _GAVE_UP:
                    continue  # the client gave up while queued: the next one
                if error.errno == errno.EINVAL:  # not listening: destroyed from outside
                    self.socket.destroyed()
                return
            factory(self, _socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd), peer)

    def _shed(self, sock: socket.socket, family: int, error: OSError) -> bool:
        """No descriptor for a connection: reset the queued ones, with the spare descriptor's
        slot, and count each. False: no spare to do it with."""
        if not SpareDescriptor.release():
            return False
        shed = 0
        try:
            for _ in range(ACCEPT_BATCH):
                try:
                    fd, _peer = sock._accept()  # type: ignore[attr-defined]
                except OSError:
                    break  # the queue is empty (or the slot was taken meanwhile)
                conn = _socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fd)
                set_reset(conn)
                conn.close()
                shed += 1
        finally:
            SpareDescriptor.keep()
        out_of_descriptors(self.route, self.loop.time(), error, "accept", shed)
        return True

    def _pause(self, error: OSError) -> None:
        """No descriptor for a connection and none to spare: leave the queues alone for a
        moment (the clients wait in them)."""
        for sock in self.sockets():
            self.reactor.modify(sock.fileno(), 0)
        self._paused = self.loop.call_later(ACCEPT_PAUSE_S, self._resume)
        out_of_descriptors(self.route, self.loop.time(), error, "accept", 0)

    def _resume(self) -> None:
        self._paused = None
        for sock in self.sockets():
            self.reactor.modify(sock.fileno(), LEVEL)
