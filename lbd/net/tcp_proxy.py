"""The TCP data path: a pair of ``asyncio.Protocol``s per proxied connection.

Flow control is cross-coupled: when one side's transport buffer passes its high-water mark
(``pause_writing``), the *other* side stops reading, so a slow reader never makes lbd buffer
more than about one transport buffer per direction. EOF is propagated as a half-close
(``write_eof``) and ``eof_received`` returns True, so the other direction keeps flowing until it
finishes too. A reset is propagated as a reset (SO_LINGER 0), never turned into a clean close.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import struct
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from lbd.route import MAX_CONNECT_TRIES, Route, try_timeout

if TYPE_CHECKING:
    from lbd.net.connections import ConnectionSet
    from lbd.pool import UpstreamEndpoint


class ListenerView(Protocol):
    """What a connection needs of the listener that accepted it."""

    route: Route
    removed: bool


log = structlog.get_logger("lbd.tcp")

_LINGER_RESET = struct.pack("ii", 1, 0)

# Connection ids: unique per process, and across the workers of one lbd (the pid is part of
# each), short enough to grep. Every log line about a connection carries its id.
_PID_PREFIX = f"{os.getpid():x}"
_next_id = itertools.count(1)


def _connection_id() -> str:
    return f"{_PID_PREFIX}-{next(_next_id):x}"


def send_reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST instead of a FIN, dropping anything still buffered."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # OSError: the socket is already gone, and abort() below is all that is left to do.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


class Downstream(asyncio.Protocol):
    """The client side of a proxied connection; owns the connection's lifetime."""

    __slots__ = (
        "_connect_task",
        "_drain_timer",
        "_idle_timer",
        "_loop",
        "_pending",
        "client",
        "client_eof",
        "closed",
        "connected",
        "connections",
        "endpoint",
        "id",
        "last_activity",
        "listener",
        "received",
        "route",
        "sent",
        "started",
        "transport",
        "upstream",
        "upstream_eof",
    )

    def __init__(self, listener: ListenerView, connections: ConnectionSet[Downstream]) -> None:
        self.listener = listener
        self.route = listener.route  # kept for the connection's life, even if re-pointed
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.endpoint: UpstreamEndpoint | None = None
        self._pending: list[bytes] = []
        self._connect_task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self.client = ""
        self.client_eof = False
        self.upstream_eof = False
        self.closed = False
        self.received = 0  # bytes from the client
        self.sent = 0  # bytes from the upstream, written to the client
        self.started = 0.0
        self.connected = 0.0  # when the upstream connect succeeded (0: not yet)
        self.last_activity = 0.0
        self.id = _connection_id()

    # -- asyncio.Protocol, client side -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._loop = loop = asyncio.get_running_loop()
        self.started = self.last_activity = loop.time()
        route = self.route
        stats = route.stats
        stats.downstream_cx_total += 1
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        if not route.pool.eligible():
            stats.downstream_cx_refused_no_endpoint += 1
            self.closed = True
            send_reset(transport)
            return
        stats.downstream_cx_active += 1
        self.connections.add(self)
        # Hold the client's bytes until an upstream exists; a chunk already on its way may
        # still arrive (uvloop), and is kept in _pending.
        transport.pause_reading()
        self._connect_task = loop.create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.last_activity = self._loop.time()
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)
        else:
            self._pending.append(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.upstream_eof:
                self.finish("completed")
            elif not upstream.transport.is_closing():
                upstream.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.finish("client_reset" if exc else "client_closed", abort=exc is not None)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.upstream.transport.is_closing():
            self.upstream.transport.resume_reading()

    # -- upstream connect ----------------------------------------------------------------------

    async def _connect(self) -> None:
        route = self.route
        stats = route.stats
        loop = self._loop
        tried: list[UpstreamEndpoint] = []
        for attempt in range(MAX_CONNECT_TRIES):
            eligible = route.pool.eligible()
            endpoint = route.balancer.pick(eligible, self.client, tried)
            if endpoint is None:
                break
            tried.append(endpoint)
            if attempt:
                stats.upstream_cx_retries += 1
            route.pool.acquire(endpoint)  # counted while connecting, for least-connection
            stats.upstream_cx_total += 1
            endpoint.stats.cx_total += 1
            began = loop.time()
            # proto IPPROTO_TCP (not 0): asyncio's transports set TCP_NODELAY only then.
            sock = socket.socket(endpoint.family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            try:
                sock.setblocking(False)
                left = len(eligible) - len(tried) + 1
                async with asyncio.timeout(try_timeout(route.connect_timeout, attempt, left)):
                    await loop.sock_connect(sock, (endpoint.address, endpoint.port))
            except TimeoutError:
                stats.upstream_cx_connect_timeout += 1
                endpoint.stats.connect_timeout += 1
                self._connect_failed(sock, endpoint, "timeout")
                continue
            except OSError as error:
                stats.upstream_cx_connect_fail += 1
                endpoint.stats.connect_fail += 1
                self._connect_failed(sock, endpoint, error.strerror or type(error).__name__)
                continue
            except asyncio.CancelledError:
                sock.close()
                route.pool.release(endpoint)
                raise
            self.connected = loop.time()
            endpoint.stats.connect_seconds.observe(self.connected - began)
            self.endpoint = endpoint
            try:
                await loop.create_connection(lambda: Upstream(self), sock=sock)
            except OSError as error:
                endpoint.stats.connect_fail += 1
                self._connect_failed(sock, endpoint, error.strerror or type(error).__name__)
                self.endpoint = None
                continue
            return
        stats.upstream_cx_none_succeeded += 1
        log.warning(
            "no endpoint accepted the connection",
            connection=self.id,
            route=self.route.label,
            tries=len(tried),
        )
        if not self.closed:
            self.finish("connect_failed", abort=True)

    def _connect_failed(self, sock: socket.socket, endpoint: UpstreamEndpoint, why: str) -> None:
        sock.close()
        self.route.pool.release(endpoint)
        log.warning(
            "upstream connect failed",
            connection=self.id,
            route=self.route.label,
            endpoint=str(endpoint),
            error=why,
        )

    def attach(self, upstream: Upstream) -> None:
        """Called from the upstream's ``connection_made``: start moving bytes."""
        if self.closed:
            upstream.transport.abort()
            return
        self.upstream = upstream
        transport = upstream.transport
        if self._pending:
            transport.write(b"".join(self._pending))
            self._pending.clear()
        if self.client_eof:
            transport.write_eof()
        else:
            assert self.transport is not None
            self.transport.resume_reading()
        timeout = self.route.idle_timeout
        self._idle_timer = self._loop.call_at(self.last_activity + timeout, self._check_idle)

    def _check_idle(self) -> None:
        deadline = self.last_activity + self.route.idle_timeout
        if self._loop.time() >= deadline:
            self.route.stats.idle_timeouts += 1
            self.finish("idle_timeout")
        else:
            self._idle_timer = self._loop.call_at(deadline, self._check_idle)

    # -- draining (reload, shutdown) ---------------------------------------------------------

    def start_draining(self, timeout: float) -> None:
        """Keep flowing, but close when ``timeout`` has passed (the first deadline holds)."""
        if self._drain_timer is None and not self.closed:
            self._drain_timer = self._loop.call_later(timeout, self.finish, "drain_timeout")

    def stop_draining(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    # -- the end ---------------------------------------------------------------------------------

    def finish(self, reason: str, *, abort: bool = False) -> None:
        """End the connection once: close (or reset) both sides and release the endpoint."""
        if self.closed:
            return
        self.closed = True
        route = self.route
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        for transport in (self.transport, self.upstream.transport if self.upstream else None):
            if transport is None or transport.is_closing():
                continue
            if abort:
                send_reset(transport)
            else:
                transport.close()
        endpoint = self.endpoint
        if endpoint is not None:
            route.pool.release(endpoint)
            self.endpoint = None
            endpoint.stats.bytes_sent += self.received
            endpoint.stats.bytes_received += self.sent
        stats = route.stats
        stats.downstream_cx_active -= 1
        stats.downstream_bytes_received += self.received
        stats.upstream_bytes_received += self.sent
        stats.cx_length_seconds.observe(self._loop.time() - self.started)
        self.connections.discard(self)
        if route.access_log:
            self._log_access(reason)

    def _log_access(self, reason: str) -> None:
        upstream = self.upstream
        log.info(
            "connection closed",
            connection=self.id,
            service=f"{self.route.namespace}/{self.route.service}",
            port=self.route.port_name,
            client=self.client,
            endpoint=str(upstream.endpoint) if upstream else None,
            bytes_received=self.received,
            bytes_sent=self.sent,
            duration_s=round(self._loop.time() - self.started, 6),
            end=reason,
        )


class Upstream(asyncio.Protocol):
    """The endpoint side of a proxied connection; forwards everything to its Downstream."""

    __slots__ = ("downstream", "endpoint", "transport")

    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream
        self.endpoint = downstream.endpoint
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.downstream.attach(self)

    def data_received(self, data: bytes) -> None:
        downstream = self.downstream
        downstream.sent += len(data)
        downstream.last_activity = downstream._loop.time()
        assert downstream.transport is not None
        downstream.transport.write(data)

    def eof_received(self) -> bool:
        downstream = self.downstream
        downstream.upstream_eof = True
        if downstream.client_eof:
            downstream.finish("completed")
        else:
            assert downstream.transport is not None
            if not downstream.transport.is_closing():
                downstream.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        downstream = self.downstream
        if not downstream.closed:
            downstream.finish("upstream_reset" if exc else "upstream_closed", abort=exc is not None)

    def pause_writing(self) -> None:
        transport = self.downstream.transport
        if transport is not None:
            transport.pause_reading()

    def resume_writing(self) -> None:
        transport = self.downstream.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
