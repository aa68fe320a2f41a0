"""Connecting a client connection to an endpoint: picks, per-try deadlines and retries.

A client connection (``lbd.net.tcp_proxy.Downstream``, seen here through ``Connecting``) makes
up to ``MAX_CONNECT_TRIES`` tries, each to an endpoint the strategy picks among those not tried
yet, under an escalating per-try deadline (``try_timeout``). Each try is a ``ConnectTry``; the
connection holds the one in flight. A refused or timed-out try is counted against its endpoint
(and outlier detection) and the next one starts; a try that fails for lack of lbd's own
descriptors sheds the connection instead.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import select
import socket
from typing import Any, Protocol

import structlog

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.route import Route
from lbd.net import proxy_protocol, tcp_faults
from lbd.net.connections import ConnectionSet
from lbd.net.descriptors import OUT_OF_DESCRIPTORS, out_of_descriptors
from lbd.net.idle import Idler
from lbd.net.proxy_protocol import Address
from lbd.net.reactor import READABLE, Reactor
from lbd.net.tcp_upstream import Upstream

log = structlog.get_logger("lbd.tcp")

# Tries of one client connection: each picks an endpoint not tried yet. Per-try timeouts grow
# as kube-proxy's userspace proxier did (250 ms, 500 ms, 1 s ...), scaled to connectTimeout:
# a refused connect fails at once anyway, and a black-holed endpoint should not hold the
# client for a full connectTimeout while other endpoints wait for their chance. The last
# candidate always gets the full connectTimeout, so a one-endpoint service is never cut short.
MAX_CONNECT_TRIES = 8
TRY_TIMEOUT_SCALE = (0.25, 0.5)
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK  # non-blocking from the start: no fcntl
_UNDER_WAY = frozenset({0, errno.EINPROGRESS})


def try_timeout(connect_timeout: float, attempt: int, candidates_left: int) -> float:
    if candidates_left > 1 and attempt < len(TRY_TIMEOUT_SCALE):
        return connect_timeout * TRY_TIMEOUT_SCALE[attempt]
    return connect_timeout


class Connecting(tcp_faults.Faultable, Protocol):
    """What the tries need of the client connection they serve (with a port's faults, the
    tries make its upstream half themselves: ``lbd.net.tcp_faults``)."""

    route: Route
    client: str
    client_port: int
    closed: bool
    trying: ConnectTry | None  # the try in flight, if any
    loop: asyncio.AbstractEventLoop
    reactor: Reactor

    @property
    def id(self) -> str: ...

    @property
    def external(self) -> bool: ...

    def new_upstream(
        self, endpoint: UpstreamEndpoint, tried: list[UpstreamEndpoint]
    ) -> Upstream: ...

    def finish(self, reason: str, *, abort: bool = False) -> None: ...

    def detach_upstream(self) -> None: ...  # drop (and reset) the upstream half it had


class Attaching(Connecting, Protocol):
    """What ``attach`` needs of the client connection."""

    sock: _socket.socket | None  # the client's
    connections: ConnectionSet[Any]  # the worker's; its ``connecting`` wheel holds deadlines
    upstream: Upstream | None
    endpoint: UpstreamEndpoint | None
    pending: list[bytes] | None  # bytes that arrived before the upstream existed
    addresses: tuple[Address, Address] | None  # (client, destination) from a PROXY header
    client_eof: bool
    reading: bool

    def read(self, drain: bool = True) -> None: ...

    def file_idle(self) -> None: ...


def try_next(connection: Attaching, tried: list[UpstreamEndpoint]) -> None:
    """Start the next try: an endpoint not in ``tried``, under its own deadline; or give up
    once none is left (or MAX_CONNECT_TRIES were made)."""
    route = connection.route
    loop = connection.loop
    attempt = len(tried)
    endpoint: UpstreamEndpoint | None = None
    eligible: list[UpstreamEndpoint] = []
    if attempt < MAX_CONNECT_TRIES:
        eligible = route.pool.eligible(connection.external)
        endpoint = route.pick(
            eligible, connection.client, loop.time(), tried, connection.client_port
        )
        limit = route.tunables.max_connections_per_endpoint
        if limit is not None and endpoint is not None and endpoint.active >= limit:
            endpoint = _pick_under_limit(connection, eligible, tried, limit)
    if endpoint is None:
        connection.trying = None
        _none_succeeded(connection, attempt)
        return
    faults = route.faults  # the one check of a port without faults: None
    if faults is None:
        upstream = connection.new_upstream(endpoint, tried)
    else:
        made = tcp_faults.upstream(connection, endpoint, faults, tried)
        if made is None:
            _refused_by_fault(connection, endpoint, tried)
            return
        upstream = made
    tried.append(endpoint)
    if attempt:
        route.stats.upstream_cx_retries_total += 1
    route.pool.acquire(endpoint)  # counted while connecting, for least-connection
    endpoint.stats.upstream_cx_total += 1
    began = loop.time()
    timeout = try_timeout(route.tunables.connect_timeout, attempt, len(eligible) - attempt)
    attempt_ = connection.trying = ConnectTry(connection, upstream, tried, began, began + timeout)
    attempt_.start()


def _refused_by_fault(
    connection: Attaching, endpoint: UpstreamEndpoint, tried: list[UpstreamEndpoint]
) -> None:
    """A ``refuse`` fault reset the connection, or made ``endpoint`` refuse this try: that is
    counted as a real refusal would be, and the next try starts."""
    if connection.closed:
        return
    tried.append(endpoint)
    connection.route.pool.acquire(endpoint)
    endpoint.stats.upstream_cx_total += 1
    endpoint.stats.upstream_cx_connect_fail_total += 1
    _connect_failed(connection, endpoint, "refused (fault)")
    try_next(connection, tried)


class ConnectTry:
    """One connect try in flight: a non-blocking socket in the worker's reactor, and the
    deadline of the try. Nothing of the event loop's connection machinery (no coroutine, no
    Task, no transport): the socket joins the connection's halves as it is once connected."""

    __slots__ = ("began", "connection", "deadline", "idle_bucket", "sock", "tried", "upstream")

    def __init__(
        self,
        connection: Attaching,
        upstream: Upstream,
        tried: list[UpstreamEndpoint],
        began: float,
        deadline: float,
    ) -> None:
        self.connection = connection
        self.upstream = upstream
        self.tried = tried  # endpoints of this connection's tries so far, this one's included
        self.began = began
        self.deadline = deadline
        self.sock: _socket.socket | None = None
        # Filed under its deadline in the connections' ``connecting`` wheel: a set entry, not
        # a loop timer per connection.
        self.idle_bucket: set[Idler] | None = None

    def start(self) -> None:
        """Send the SYN (the connection holds this try already)."""
        endpoint = self.upstream.endpoint
        try:
            sock = _socket.socket(endpoint.family, _STREAM, socket.IPPROTO_TCP)
        except OSError as error:
            self._failed(error)
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex((endpoint.address, endpoint.port))
        except OSError as error:
            sock.close()
            self._failed(error)
            return
        if code not in _UNDER_WAY:
            sock.close()
            self._failed(OSError(code, os.strerror(code)))
            return
        self.sock = sock
        connection = self.connection
        connection.connections.connecting.file(self, self.deadline)
        connection.reactor.add(sock.fileno(), self.on_event)

    def on_event(self, events: int) -> None:
        """The socket connected (writable) or failed (an error), whichever the kernel says."""
        sock = self.sock
        if sock is None:
            return
        if events & select.EPOLLERR:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.sock = None
            self.connection.reactor.close(sock)
            if self.connection.trying is self:
                self._failed(OSError(code, os.strerror(code)))
            return
        if events & select.EPOLLOUT:
            self._connected(sock, events)

    def _connected(self, sock: _socket.socket, events: int) -> None:
        connection = self.connection
        connection.connections.connecting.remove(self)
        self.sock = None
        upstream = self.upstream
        if connection.trying is not self:
            connection.reactor.close(sock)
            return
        upstream.connected(sock)
        attach(connection, upstream)
        if not upstream.attached:
            return  # refused by attach (the connection ended), which closed the socket
        connection.trying = None  # done: nothing of the connect is kept for the connection's life
        endpoint = upstream.endpoint
        endpoint.stats.upstream_cx_connect_seconds.observe(connection.loop.time() - self.began)
        outlier = connection.route.outlier
        if outlier is not None:
            outlier.connect_succeeded(endpoint)
        if events & READABLE:
            upstream.read()  # the endpoint spoke first, in the same event (edge-triggered)

    def _failed(self, error: OSError) -> None:
        connection = self.connection
        connection.connections.connecting.remove(self)
        endpoint = self.upstream.endpoint
        if error.errno in OUT_OF_DESCRIPTORS:
            connection.trying = None
            connection.route.pool.release(endpoint)
            _out_of_descriptors(connection, error)
            return
        endpoint.stats.upstream_cx_connect_fail_total += 1
        _connect_failed(connection, endpoint, error.strerror or type(error).__name__)
        try_next(connection, self.tried)

    def check_idle(self) -> None:
        """The ``connecting`` wheel's call: the deadline passed (up to a tick ago)."""
        self._timed_out()

    def _timed_out(self) -> None:
        """The deadline passed: give the try up (a late connect never half-wins)."""
        connection = self.connection
        upstream = self.upstream
        if upstream.attached or connection.closed or connection.trying is not self:
            return
        upstream.timed_out = True
        self.give_up()
        upstream.endpoint.stats.upstream_cx_connect_timeout_total += 1
        _connect_failed(connection, upstream.endpoint, "timeout")
        try_next(connection, self.tried)

    def give_up(self) -> None:
        """Stop the try: its socket closes (a connect under way is dropped with it)."""
        self.connection.connections.connecting.remove(self)
        sock = self.sock
        if sock is not None:
            self.sock = None
            self.connection.reactor.close(sock)

    def abandon(self) -> None:
        """The connection ends while this try is in flight: give it up, free its endpoint."""
        if not self.upstream.attached and self.sock is not None:
            self.give_up()
            self.connection.route.pool.release(self.upstream.endpoint)


def attach(connection: Attaching, upstream: Upstream) -> None:
    """The upstream connected: start moving bytes (what the client sent meanwhile first)."""
    if connection.closed or upstream.timed_out:
        upstream.close(abort=False)
        return
    upstream.attached = True
    connection.upstream = upstream
    connection.endpoint = upstream.endpoint
    first: list[bytes] = []
    version = connection.route.tunables.proxy_protocol
    if version is not None:
        first.append(proxy_protocol.outgoing(version, *_addresses(connection)))
    if connection.pending:
        first += connection.pending
    connection.pending = None
    whole = True
    try:
        if first:
            whole = upstream.send(b"".join(first))
        if connection.client_eof:
            upstream.write_eof()
    except OSError:
        connection.finish("upstream_reset", abort=True)
        return
    if not connection.reading and whole:
        connection.reading = True  # paused at PENDING_LIMIT while connecting
        connection.read()
    connection.file_idle()


def _addresses(connection: Attaching) -> tuple[Address, Address]:
    """(client, destination): as a trusted PROXY header said, else the socket's own."""
    if connection.addresses is not None:
        return connection.addresses
    assert connection.sock is not None
    peer = connection.sock.getpeername()
    local = connection.sock.getsockname()
    return (peer[0], peer[1]), (local[0], local[1])


def _none_succeeded(connection: Connecting, tries: int) -> None:
    route = connection.route
    route.stats.upstream_cx_connect_attempts_exceeded_total += 1
    skipped = route.log_limiter.allow(None, connection.loop.time())
    if skipped is not None:
        log.warning(
            "no endpoint accepted the connection",
            connection=connection.id,
            route=route.label,
            tries=tries,
            similar_lines_skipped=skipped,
        )
    if not connection.closed:
        connection.finish("connect_failed", abort=True)


def _out_of_descriptors(connection: Connecting, error: OSError) -> None:
    """No socket for the upstream (EMFILE/ENFILE/ENOBUFS): shed this connection with a reset
    at once, which also frees its descriptor; other endpoints would fail the same."""
    out_of_descriptors(connection.route, connection.loop.time(), error, "connect", shed=1)
    connection.finish("fd_exhausted", abort=True)


def _pick_under_limit(
    connection: Connecting,
    eligible: list[UpstreamEndpoint],
    tried: list[UpstreamEndpoint],
    limit: int,
) -> UpstreamEndpoint | None:
    """An endpoint at its maxConnectionsPerEndpoint: the connection goes to another."""
    skip = list(tried)
    while True:
        endpoint = connection.route.balancer.pick(eligible, connection.client, skip)
        if endpoint is None or endpoint.active < limit:
            if endpoint is None and not tried:
                connection.route.stats.downstream_cx_refused_total.endpoint_limits += 1
            return endpoint
        skip.append(endpoint)


def _connect_failed(connection: Connecting, endpoint: UpstreamEndpoint, why: str) -> None:
    route = connection.route
    route.pool.release(endpoint)
    if route.outlier is not None:
        route.outlier.connect_failed(endpoint)
    skipped = route.log_limiter.allow(endpoint, connection.loop.time())
    if skipped is not None:
        log.warning(
            "upstream connect failed",
            connection=connection.id,
            route=route.label,
            endpoint=str(endpoint),
            error=why,
            similar_lines_skipped=skipped,
        )


def retry_elsewhere(connection: Attaching, upstream: Upstream, why: str) -> None:
    """The endpoint closed or reset the connection before a byte passed either way and before
    lbd forwarded any of the client's: nothing was delivered, so another endpoint may take the
    client (a backend that died with connections in its accept queue resets them all).
    Another try, as after a refused connect, within the same limit."""
    endpoint = upstream.endpoint
    upstream.attached = False
    endpoint.stats.upstream_cx_closed_before_data_total += 1
    connection.detach_upstream()
    _connect_failed(connection, endpoint, why)  # releases it, tells outlier detection
    try_next(connection, upstream.tried)
