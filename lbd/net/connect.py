"""Connecting a client connection to an endpoint: picks, per-try deadlines and retries.

``UpstreamConnector`` is the connect half of ``lbd.net.tcp_proxy.Downstream``, kept here so
that each file reads in one sitting; its state lives in Downstream's slots. A connection makes
up to ``MAX_CONNECT_TRIES`` tries, each to an endpoint the strategy picks among those not tried
yet, under an escalating per-try deadline (``try_timeout``). A refused or timed-out
try is counted against its endpoint (and outlier detection) and the next one starts; a try that
fails for lack of lbd's own descriptors sheds the connection instead.
"""

from __future__ import annotations

import asyncio
import errno
import functools
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog

from lbd.endpoints.route import Route

if TYPE_CHECKING:
    from lbd.endpoints.endpoint import UpstreamEndpoint
    from lbd.net.tcp_proxy import ListenerView, Upstream

log = structlog.get_logger("lbd.tcp")

# Tries of one client connection: each picks an endpoint not tried yet. Per-try timeouts grow
# as kube-proxy's userspace proxier did (250 ms, 500 ms, 1 s ...), scaled to connectTimeout:
# a refused connect fails at once anyway, and a black-holed endpoint should not hold the
# client for a full connectTimeout while other endpoints wait for their chance. The last
# candidate always gets the full connectTimeout, so a one-endpoint service is never cut short.
MAX_CONNECT_TRIES = 8
TRY_TIMEOUT_SCALE = (0.25, 0.5)


def try_timeout(connect_timeout: float, attempt: int, candidates_left: int) -> float:
    if candidates_left > 1 and attempt < len(TRY_TIMEOUT_SCALE):
        return connect_timeout * TRY_TIMEOUT_SCALE[attempt]
    return connect_timeout


# A connect that fails with one of these failed for lack of lbd's own resources, not the
# endpoint's: it is shed, not retried elsewhere or held against the endpoint.
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _same(upstream: Upstream) -> Upstream:
    """A protocol factory that returns the Upstream made before the connect started."""
    return upstream


class ConnectTry:
    """One connect try in flight: ``loop.create_connection``'s coroutine, stepped by hand.

    A Task per connection would cost its creation, its entry in asyncio's set of all tasks,
    a context copy and a loop turn before the connect even starts; the connect needs none of
    it. The coroutine is started at once and resumed from the done callback of the future it
    waits for (this object is that callback), until it returns or raises."""

    __slots__ = (
        "began",
        "cancelled",
        "connector",
        "coro",
        "timer",
        "tried",
        "upstream",
        "waited",
    )

    def __init__(
        self,
        connector: UpstreamConnector,
        upstream: Upstream,
        tried: list[UpstreamEndpoint],
        began: float,
    ) -> None:
        self.connector = connector
        self.upstream = upstream
        self.tried = tried  # endpoints of this connection's tries so far, this one's included
        self.began = began
        self.cancelled = False  # given up while not waiting on a future: throw at next step
        self.coro: Coroutine[Any, Any, object] | None = None  # None once it has ended
        self.timer: asyncio.TimerHandle
        self.waited: asyncio.Future[Any] | None = None  # what the coroutine waits for

    def __call__(self, _waited: object) -> None:
        self.connector._step(self)


class UpstreamConnector:
    """Mixin: the tries of one client connection (see the module docstring)."""

    __slots__ = ("_trying",)  # the try in flight, if any
    # Downstream's state that the tries use and update.
    route: Route
    listener: ListenerView
    client: str
    closed: bool
    _loop: asyncio.AbstractEventLoop

    @property
    def id(self) -> str:
        raise NotImplementedError

    def new_upstream(self, endpoint: UpstreamEndpoint) -> Upstream:
        raise NotImplementedError

    def finish(self, reason: str, *, abort: bool = False) -> None:
        raise NotImplementedError

    def _try_next(self, tried: list[UpstreamEndpoint]) -> None:
        """Start the next try: an endpoint not in ``tried``, under its own deadline; or give
        up once none is left (or MAX_CONNECT_TRIES were made)."""
        route = self.route
        loop = self._loop
        attempt = len(tried)
        endpoint: UpstreamEndpoint | None = None
        eligible: list[UpstreamEndpoint] = []
        if attempt < MAX_CONNECT_TRIES:
            eligible = route.pool.eligible(self.listener.external)
            endpoint = route.pick(eligible, self.client, loop.time(), tried)
            limit = route.tunables.max_connections_per_endpoint
            if limit is not None and endpoint is not None and endpoint.active >= limit:
                endpoint = self._pick_under_limit(eligible, tried, limit)
        if endpoint is None:
            self._trying = None
            self._none_succeeded(attempt)
            return
        tried.append(endpoint)
        stats = route.stats
        if attempt:
            stats.upstream_cx_retries_total += 1
        route.pool.acquire(endpoint)  # counted while connecting, for least-connection
        endpoint.stats.upstream_cx_total += 1
        upstream = self.new_upstream(endpoint)
        began = loop.time()
        deadline = began + try_timeout(
            route.tunables.connect_timeout, attempt, len(eligible) - attempt
        )
        attempt_ = ConnectTry(self, upstream, tried, began)
        attempt_.timer = loop.call_at(deadline, self._connect_timed_out, attempt_)
        self._trying = attempt_
        # Host and port, not a socket and loop.sock_connect: uvloop resolves an IP literal in
        # place here, while sock_connect sends every connect through libuv's thread pool for
        # getaddrinfo (measured: ~130 us of CPU and two context switches per connection).
        attempt_.coro = loop.create_connection(
            functools.partial(_same, upstream), endpoint.address, endpoint.port
        )
        self._step(attempt_)

    def _step(self, attempt: ConnectTry) -> None:
        """Run the try's coroutine to its next wait; act on its end (what a Task step does)."""
        coro = attempt.coro
        assert coro is not None
        try:
            if attempt.cancelled:  # given up during a bare yield: nothing to cancel but it
                attempt.cancelled = False
                waited = coro.throw(asyncio.CancelledError())
            else:  # a cancelled future raises CancelledError in it, as a Task's would
                waited = coro.send(None)
        except StopIteration:
            attempt.coro = None
            self._connected(attempt)
            return
        except OSError as error:
            attempt.coro = None
            if self._trying is attempt:
                self._try_failed(attempt, error)
            return
        except asyncio.CancelledError:  # this try was given up (timed out, client left)
            attempt.coro = None
            return
        attempt.waited = waited
        if waited is None:  # a bare yield: resume at the next loop turn
            self._loop.call_soon(attempt, None)
        else:
            waited.add_done_callback(attempt)

    def _connected(self, attempt: ConnectTry) -> None:
        attempt.timer.cancel()
        if self._trying is not attempt or not attempt.upstream.attached:
            return  # given up after connection_made (attach refused it or it was closed)
        self._trying = None  # done: nothing of the connect is kept for the connection's life
        now = self._loop.time()
        endpoint = attempt.upstream.endpoint
        endpoint.stats.upstream_cx_connect_seconds.observe(now - attempt.began)
        if self.route.outlier is not None:
            self.route.outlier.connect_succeeded(endpoint)

    def _try_failed(self, attempt: ConnectTry, error: OSError) -> None:
        attempt.timer.cancel()
        endpoint = attempt.upstream.endpoint
        if error.errno in OUT_OF_DESCRIPTORS:
            self._trying = None
            self.route.pool.release(endpoint)
            self._out_of_descriptors(error)
            return
        endpoint.stats.upstream_cx_connect_fail_total += 1
        self._connect_failed(endpoint, error.strerror or type(error).__name__)
        self._try_next(attempt.tried)

    def _give_up(self, attempt: ConnectTry) -> None:
        """Stop a try in flight as Task.cancel would: cancel the future it waits for, so that
        its next step raises CancelledError inside it (uvloop then closes the half-made
        transport; asyncio's sock_connect first removes the socket's writer). A future that
        is already done keeps its outcome, which the next step takes (and ignores)."""
        attempt.timer.cancel()
        waited = attempt.waited
        if waited is None:
            attempt.cancelled = True
        else:
            waited.cancel()  # its callbacks, ``attempt`` last, run at the next loop turn

    def _none_succeeded(self, tries: int) -> None:
        route = self.route
        route.stats.upstream_cx_connect_attempts_exceeded_total += 1
        skipped = route.log_limiter.allow(None, self._loop.time())
        if skipped is not None:
            log.warning(
                "no endpoint accepted the connection",
                connection=self.id,
                route=route.label,
                tries=tries,
                similar_lines_skipped=skipped,
            )
        if not self.closed:
            self.finish("connect_failed", abort=True)

    def _out_of_descriptors(self, error: OSError) -> None:
        """No socket for the upstream (EMFILE/ENFILE/ENOBUFS): shed this connection with a
        reset at once, which also frees its descriptor; other endpoints would fail the same."""
        route = self.route
        route.stats.downstream_cx_refused_total.fd_exhausted += 1
        now = self._loop.time()
        if now - route.fd_exhausted_logged_at >= 1.0:  # at most one line a second
            route.fd_exhausted_logged_at = now
            log.error(
                "out of file descriptors",
                route=route.label,
                error=error.strerror or str(error),
                shed_total=route.stats.downstream_cx_refused_total.fd_exhausted,
            )
        self.finish("fd_exhausted", abort=True)

    def _pick_under_limit(
        self, eligible: list[UpstreamEndpoint], tried: list[UpstreamEndpoint], limit: int
    ) -> UpstreamEndpoint | None:
        """An endpoint at its maxConnectionsPerEndpoint: the connection goes to another."""
        skip = list(tried)
        while True:
            endpoint = self.route.balancer.pick(eligible, self.client, skip)
            if endpoint is None or endpoint.active < limit:
                if endpoint is None and not tried:
                    self.route.stats.downstream_cx_refused_total.endpoint_limits += 1
                return endpoint
            skip.append(endpoint)

    def _connect_timed_out(self, attempt: ConnectTry) -> None:
        """The try's deadline passed. An attempt that already attached has won the race; one
        that attaches after this is refused (``attach``), so a late connect never half-wins."""
        upstream = attempt.upstream
        if upstream.attached or self.closed or self._trying is not attempt:
            return
        upstream.timed_out = True
        self._give_up(attempt)
        upstream.endpoint.stats.upstream_cx_connect_timeout_total += 1
        self._connect_failed(upstream.endpoint, "timeout")
        self._try_next(attempt.tried)

    def _connect_failed(self, endpoint: UpstreamEndpoint, why: str) -> None:
        self.route.pool.release(endpoint)
        if self.route.outlier is not None:
            self.route.outlier.connect_failed(endpoint)
        skipped = self.route.log_limiter.allow(endpoint, self._loop.time())
        if skipped is not None:
            log.warning(
                "upstream connect failed",
                connection=self.id,
                route=self.route.label,
                endpoint=str(endpoint),
                error=why,
                similar_lines_skipped=skipped,
            )
