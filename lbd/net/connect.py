"""Connecting a client connection to an endpoint: picks, per-try deadlines and retries.

A client connection (``lbd.net.tcp_proxy.Downstream``, seen here through ``Connecting``) makes
up to ``MAX_CONNECT_TRIES`` tries, each to an endpoint the strategy picks among those not tried
yet, under an escalating per-try deadline (``try_timeout``). Each try is a ``ConnectTry``; the
connection holds the one in flight. A refused or timed-out try is counted against its endpoint
(and outlier detection) and the next one starts; a try that fails for lack of lbd's own
descriptors sheds the connection instead.
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Coroutine
from typing import Any, Protocol, cast

import structlog

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.route import Route
from lbd.net import tcp_faults

log = structlog.get_logger("lbd.tcp")

# Tries of one client connection: each picks an endpoint not tried yet. Per-try timeouts grow
# as kube-proxy's userspace proxier did (250 ms, 500 ms, 1 s ...), scaled to connectTimeout:
# a refused connect fails at once anyway, and a black-holed endpoint should not hold the
# client for a full connectTimeout while other endpoints wait for their chance. The last
# candidate always gets the full connectTimeout, so a one-endpoint service is never cut short.
MAX_CONNECT_TRIES = 8
TRY_TIMEOUT_SCALE = (0.25, 0.5)
# A connect that fails with one of these failed for lack of lbd's own resources, not the
# endpoint's: it is shed, not retried elsewhere or held against the endpoint.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def try_timeout(connect_timeout: float, attempt: int, candidates_left: int) -> float:
    if candidates_left > 1 and attempt < len(TRY_TIMEOUT_SCALE):
        return connect_timeout * TRY_TIMEOUT_SCALE[attempt]
    return connect_timeout


class UpstreamHalf(Protocol):
    """The endpoint side a try connects (``lbd.net.tcp_proxy.Upstream``)."""

    endpoint: UpstreamEndpoint
    attached: bool  # the connection's upstream now (its connection_made was accepted)
    timed_out: bool  # its try's deadline passed before it connected
    tried: list[UpstreamEndpoint]  # this connection's tries so far, its own included


class Connecting(tcp_faults.Faultable, Protocol):
    """What the tries need of the client connection they serve (with a port's faults, the
    tries make its upstream half themselves: ``lbd.net.tcp_faults``)."""

    route: Route
    client: str
    client_port: int
    closed: bool
    trying: ConnectTry | None  # the try in flight, if any
    loop: asyncio.AbstractEventLoop

    @property
    def id(self) -> str: ...

    @property
    def external(self) -> bool: ...

    def new_upstream(
        self, endpoint: UpstreamEndpoint, tried: list[UpstreamEndpoint]
    ) -> UpstreamHalf: ...

    def finish(self, reason: str, *, abort: bool = False) -> None: ...

    def detach_upstream(self) -> None: ...  # drop (and abort) the upstream half it had


def _same(upstream: UpstreamHalf) -> asyncio.BaseProtocol:
    """A protocol factory that returns the Upstream made before the connect started."""
    return cast(asyncio.BaseProtocol, upstream)


def try_next(connection: Connecting, tried: list[UpstreamEndpoint]) -> None:
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
    connection: Connecting, endpoint: UpstreamEndpoint, tried: list[UpstreamEndpoint]
) -> None:
    """A ``refuse`` fault reset the connection, or made ``endpoint`` refuse this try: that is
    counted as a real refusal would be, and the next try starts."""
    if connection.closed:
        return
    tried.append(endpoint)
    connection.route.pool.acquire(endpoint)
    endpoint.stats.upstream_cx_total += 1
    endpoint.stats.upstream_cx_connect_fail_total += 1
    connect_failed(connection, endpoint, "refused (fault)")
    try_next(connection, tried)


class ConnectTry:
    """One connect try in flight: ``loop.create_connection``'s coroutine, stepped by hand.

    A Task per connection would cost its creation, its entry in asyncio's set of all tasks,
    a context copy and a loop turn before the connect even starts; the connect needs none of
    it. The coroutine is started at once and resumed from the done callback of the future it
    waits for (this object is that callback), until it returns or raises."""

    __slots__ = (
        "began",
        "cancelled",
        "connection",
        "coro",
        "timer",
        "tried",
        "upstream",
        "waited",
    )

    def __init__(
        self,
        connection: Connecting,
        upstream: UpstreamHalf,
        tried: list[UpstreamEndpoint],
        began: float,
        deadline: float,
    ) -> None:
        self.connection = connection
        self.upstream = upstream
        endpoint = upstream.endpoint
        self.tried = tried  # endpoints of this connection's tries so far, this one's included
        self.began = began
        self.cancelled = False  # given up while not waiting on a future: throw at next step
        self.waited: asyncio.Future[Any] | None = None  # what the coroutine waits for
        loop = connection.loop
        self.timer = loop.call_at(deadline, self._timed_out)
        # Host and port, not a socket and loop.sock_connect: uvloop resolves an IP literal in
        # place here, while sock_connect sends every connect through libuv's thread pool for
        # getaddrinfo (measured: ~130 us of CPU and two context switches per connection).
        self.coro: Coroutine[Any, Any, object] | None = loop.create_connection(
            functools.partial(_same, self.upstream), endpoint.address, endpoint.port
        )

    def start(self) -> None:
        """Run the connect to its first wait (the connection holds this try already)."""
        self._step()

    def __call__(self, _waited: object) -> None:
        self._step()

    def _step(self) -> None:
        """Run the coroutine to its next wait; act on its end (what a Task step does)."""
        coro = self.coro
        assert coro is not None
        try:
            if self.cancelled:  # given up during a bare yield: nothing to cancel but it
                self.cancelled = False
                waited = coro.throw(asyncio.CancelledError())
            else:  # a cancelled future raises CancelledError in it, as a Task's would
                waited = coro.send(None)
        except StopIteration:
            self.coro = None
            self._connected()
            return
        except OSError as error:
            self.coro = None
            if self.connection.trying is self:
                self._failed(error)
            return
        except asyncio.CancelledError:  # this try was given up (timed out, client left)
            self.coro = None
            return
        self.waited = waited
        if waited is None:  # a bare yield: resume at the next loop turn
            self.connection.loop.call_soon(self, None)
        else:
            waited.add_done_callback(self)

    def _connected(self) -> None:
        self.timer.cancel()
        connection = self.connection
        if connection.trying is not self or not self.upstream.attached:
            return  # given up after connection_made (attach refused it or it was closed)
        connection.trying = None  # done: nothing of the connect is kept for the connection's life
        endpoint = self.upstream.endpoint
        endpoint.stats.upstream_cx_connect_seconds.observe(connection.loop.time() - self.began)
        outlier = connection.route.outlier
        if outlier is not None:
            outlier.connect_succeeded(endpoint)

    def _failed(self, error: OSError) -> None:
        self.timer.cancel()
        connection = self.connection
        endpoint = self.upstream.endpoint
        if error.errno in OUT_OF_DESCRIPTORS:
            connection.trying = None
            connection.route.pool.release(endpoint)
            _out_of_descriptors(connection, error)
            return
        endpoint.stats.upstream_cx_connect_fail_total += 1
        connect_failed(connection, endpoint, error.strerror or type(error).__name__)
        try_next(connection, self.tried)

    def _timed_out(self) -> None:
        """The deadline passed. A try that already attached has won the race; one that
        attaches after this is refused (``attach``), so a late connect never half-wins."""
        connection = self.connection
        upstream = self.upstream
        if upstream.attached or connection.closed or connection.trying is not self:
            return
        upstream.timed_out = True
        self.give_up()
        upstream.endpoint.stats.upstream_cx_connect_timeout_total += 1
        connect_failed(connection, upstream.endpoint, "timeout")
        try_next(connection, self.tried)

    def give_up(self) -> None:
        """Stop the try as Task.cancel would: cancel the future it waits for, so that its next
        step raises CancelledError inside it (uvloop then closes the half-made transport;
        asyncio's sock_connect first removes the socket's writer). A future that is already
        done keeps its outcome, which the next step takes (and ignores)."""
        self.timer.cancel()
        waited = self.waited
        if waited is None:
            self.cancelled = True
        else:
            waited.cancel()  # its callbacks, this try last, run at the next loop turn

    def abandon(self) -> None:
        """The connection ends while this try is in flight: give it up, free its endpoint."""
        if not self.upstream.attached and self.coro is not None:
            self.give_up()
            self.connection.route.pool.release(self.upstream.endpoint)


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
    route = connection.route
    route.stats.downstream_cx_refused_total.fd_exhausted += 1
    now = connection.loop.time()
    if now - route.fd_exhausted_logged_at >= 1.0:  # at most one line a second
        route.fd_exhausted_logged_at = now
        log.error(
            "out of file descriptors",
            route=route.label,
            error=error.strerror or str(error),
            shed_total=route.stats.downstream_cx_refused_total.fd_exhausted,
        )
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


def connect_failed(connection: Connecting, endpoint: UpstreamEndpoint, why: str) -> None:
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


def retry_elsewhere(connection: Connecting, upstream: UpstreamHalf, why: str) -> None:
    """The endpoint closed or reset the connection before a byte passed either way and before
    lbd forwarded any of the client's: nothing was delivered, so another endpoint may take the
    client (a backend that died with connections in its accept queue resets them all).
    Another try, as after a refused connect, within the same limit."""
    endpoint = upstream.endpoint
    upstream.attached = False  # its connection_lost no longer ends the connection
    endpoint.stats.upstream_cx_closed_before_data_total += 1
    connection.detach_upstream()
    connect_failed(connection, endpoint, why)  # releases it, tells outlier detection
    try_next(connection, upstream.tried)
