"""The TCP data path: a pair of ``asyncio.Protocol``s per proxied connection.

``Downstream`` (here) is the client half and owns the connection's lifetime; ``Upstream``
(``lbd.net.tcp_upstream``) is the endpoint half. Before bytes flow, a connection goes through
its accept phase (``lbd.net.tcp_accept``: source ranges, PROXY header, admission) and its
connect tries (``lbd.net.connect``).

Flow control is cross-coupled: when one side's transport buffer passes its high-water mark
(``pause_writing``), the *other* side stops reading, so a slow reader never makes lbd buffer
more than about one transport buffer per direction. EOF is propagated as a half-close
(``write_eof``) and ``eof_received`` returns True, so the other direction keeps flowing until it
finishes too. A reset is propagated as a reset (SO_LINGER 0), never turned into a clean close.
"""

from __future__ import annotations

import asyncio
from typing import cast

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.net import connect, proxy_protocol, tcp_accept
from lbd.net.connect import ConnectTry
from lbd.net.connections import (
    ConnectionSet,
    ListenerView,
    connection_id,
    log_closed,
    next_serial,
    send_reset,
)
from lbd.net.idle import Idler
from lbd.net.proxy_protocol import Address, HeaderReader
from lbd.net.splice import BULK_READ, SPLICE_AVAILABLE, SplicePump
from lbd.net.tcp_upstream import Upstream

# Client bytes held while the upstream connect is in flight; past this, reading pauses.
PENDING_LIMIT = 16 * 1024  # as HAProxy's default buffer: bounded even for a full queue


class Downstream(asyncio.Protocol):
    """The client side of a proxied connection; owns the connection's lifetime."""

    __slots__ = (
        "_drain_timer",
        "_half_closed_timer",
        "_pending",
        "_serial",
        "addresses",
        "admission",
        "client",
        "client_eof",
        "client_port",
        "closed",
        "connections",
        "endpoint",
        "header",
        "idle_bucket",
        "last_activity",
        "listener",
        "loop",
        "max_duration_timer",
        "pumps",
        "received",
        "route",
        "sent",
        "started",
        "transport",
        "trying",
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
        # Bytes that arrived before the upstream existed; None (not an empty list) the rest of
        # the time: one object less per idle connection.
        self._pending: list[bytes] | None = None
        self.trying: ConnectTry | None = None  # the connect try in flight (lbd.net.connect)
        self.idle_bucket: set[Idler] | None = None  # where the idle wheel filed it (lbd.net.idle)
        self._drain_timer: asyncio.TimerHandle | None = None
        self._half_closed_timer: asyncio.TimerHandle | None = None
        self.max_duration_timer: asyncio.TimerHandle | None = None
        # "queued" or "admitted" while this connection is in its route's Admission.
        self.admission: str | None = None
        # PROXY protocol: a trusted client's header, while it is still being read.
        self.header: HeaderReader | None = None
        # (client, destination) as a trusted PROXY header said; else the socket's own.
        self.addresses: tuple[Address, Address] | None = None
        self.client, self.client_port = "", 0  # the port: for hashOn: clientIPPort
        self.client_eof = self.upstream_eof = False
        self.closed = False
        self.received = 0  # bytes from the client
        self.sent = 0  # bytes from the upstream, written to the client
        self.started = self.last_activity = 0.0
        self._serial = 0  # numbered when first logged (see ``id``): no int object per connection
        # [upward, downward] splice pumps once a direction went bulk (lbd.net.splice).
        self.pumps: list[SplicePump | None] | None = None

    @property
    def id(self) -> str:
        """The connection id in logs: numbered the first time something is logged about the
        connection, then the same on every later line."""
        if not self._serial:
            self._serial = next_serial()
        return connection_id(self._serial)

    def keep(self, data: bytes) -> None:
        """Hold bytes that arrive before the upstream exists. Reading goes on meanwhile, so a
        client that resets or closes while lbd is still connecting is noticed at once (and its
        connect given up); past PENDING_LIMIT bytes reading pauses until the upstream exists."""
        pending = self._pending
        if pending is None:
            pending = self._pending = [data]
        else:
            pending.append(data)
        if sum(map(len, pending)) > PENDING_LIMIT and self.transport is not None:
            self.transport.pause_reading()

    # -- asyncio.Protocol, client side -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.loop = loop = self.listener.loop
        self.started = self.last_activity = loop.time()
        self.route.stats.downstream_cx_total += 1
        peer = transport.get_extra_info("peername")
        if peer:
            self.client, self.client_port = peer[0], peer[1]
        tcp_accept.accepted(self)

    def track(self) -> None:
        self.route.stats.downstream_cx_active += 1
        self.connections.add(self)

    def count_under_new_limits(self) -> None:
        tcp_accept.count_under_new_limits(self)

    @property
    def external(self) -> bool:
        """Accepted on an external listener (NodePort, LoadBalancer IP, external IP)."""
        return self.listener.external

    def admitted(self) -> None:
        """Called by the route's Admission when a queued connection gets its slot."""
        self.admission = "admitted"
        connect.try_next(self, [])

    def data_received(self, data: bytes) -> None:
        header = self.header
        if header is not None:
            tcp_accept.feed_header(self, header, data)
            return
        self.received += len(data)
        self.last_activity = self.loop.time()
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)
            if len(data) >= BULK_READ:
                self.splice(True)
        else:
            self.keep(data)

    def eof_received(self) -> bool:
        if self.header is not None:
            tcp_accept.bad_header(self, "closed before the header ended")
            return False
        self.client_ended()
        return True

    def client_ended(self) -> None:
        """The client finished sending (FIN): pass the half-close on."""
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.upstream_eof:
                self.finish("completed")
            elif not upstream.transport.is_closing():
                upstream.transport.write_eof()
        self.half_closed()

    def upstream_ended(self) -> None:
        """The endpoint finished sending (FIN): pass the half-close on."""
        self.upstream_eof = True
        if self.client_eof:
            self.finish("completed")
        else:
            assert self.transport is not None
            if not self.transport.is_closing():
                self.transport.write_eof()
            self.half_closed()

    def half_closed(self) -> None:
        """One side finished: the other gets ``halfClosedTimeout`` to finish too."""
        if self._half_closed_timer is None and not self.closed:
            timeout = self.route.tunables.half_closed_timeout
            self._half_closed_timer = self.loop.call_later(timeout, self._half_closed_expired)

    def _half_closed_expired(self) -> None:
        self.route.stats.downstream_cx_half_closed_timeout_total += 1
        self.finish("half_closed_timeout")

    def max_duration_reached(self) -> None:
        self.route.stats.downstream_cx_max_duration_reached_total += 1
        self.finish("max_duration")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.finish("client_reset" if exc else "client_closed", abort=exc is not None)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.transport.is_closing() and not self.spliced(False):
            upstream.transport.resume_reading()

    # -- splice (lbd.net.splice) ----------------------------------------------------------------

    def spliced(self, upward: bool) -> bool:
        """This direction moves by splice: its source transport must stay paused."""
        pumps = self.pumps
        return pumps is not None and pumps[0 if upward else 1] is not None

    def splice(self, upward: bool) -> None:
        """A bulk read in this direction: move it with splice(2) from now on, once nothing is
        left in the destination transport's buffer (else the next bulk read tries again)."""
        upstream = self.upstream
        if (
            not SPLICE_AVAILABLE
            or self.route.tunables.splice == "off"
            or self.closed
            or upstream is None
            or self.spliced(upward)
        ):
            return
        client = self.transport
        assert client is not None
        source, destination = (
            (client, upstream.transport) if upward else (upstream.transport, client)
        )
        try:
            pump = SplicePump.between(self.loop, source, destination, self, upward)
        except OSError:
            self.route.stats.splice_fallbacks_total += 1
            return
        if pump is None:
            return
        if self.pumps is None:
            self.pumps = [None, None]
        self.pumps[0 if upward else 1] = pump
        self.route.stats.splice_switches_total += 1

    def pumped(self, upward: bool, count: int) -> None:
        if upward:
            self.received += count
        else:
            self.sent += count
        self.route.stats.splice_bytes_total += count
        self.last_activity = self.loop.time()

    def pump_ended(self, upward: bool) -> None:
        if upward:
            self.client_ended()
        else:
            self.upstream_ended()

    def pump_failed(self, upward: bool, at_source: bool, error: OSError) -> None:
        client_failed = upward == at_source
        self.finish("client_reset" if client_failed else "upstream_reset", abort=True)

    def new_upstream(self, endpoint: UpstreamEndpoint, tried: list[UpstreamEndpoint]) -> Upstream:
        return Upstream(self, endpoint, tried)

    def retry_elsewhere(self, upstream: Upstream, why: str) -> None:
        connect.retry_elsewhere(self, upstream, why)

    def detach_upstream(self) -> None:
        upstream, self.upstream, self.endpoint = self.upstream, None, None
        if upstream is not None and not upstream.transport.is_closing():
            upstream.transport.abort()
        self.connections.idle.remove(self)

    def attach(self, upstream: Upstream) -> None:
        """Called from the upstream's ``connection_made``: start moving bytes."""
        if self.closed or upstream.timed_out:
            upstream.transport.abort()
            return
        upstream.attached = True
        self.upstream = upstream
        self.endpoint = upstream.endpoint
        transport = upstream.transport
        version = self.route.tunables.proxy_protocol
        if version is not None:
            transport.write(proxy_protocol.outgoing(version, *self._addresses()))
        if self._pending:
            transport.write(b"".join(self._pending))
        self._pending = None
        if self.client_eof:
            transport.write_eof()
        else:
            assert self.transport is not None
            self.transport.resume_reading()
        self.connections.idle.file(self, self.last_activity + self.route.tunables.idle_timeout)

    def _addresses(self) -> tuple[Address, Address]:
        """(client, destination): as a trusted PROXY header said, else the socket's own."""
        if self.addresses is not None:
            return self.addresses
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        return (peer[0], peer[1]), (local[0], local[1])

    def check_idle(self) -> None:
        """Called by the idle wheel when the deadline this connection was filed under passed."""
        if self.closed:
            return
        deadline = self.last_activity + self.route.tunables.idle_timeout
        if self.loop.time() >= deadline:
            self.route.stats.downstream_cx_idle_timeout_total += 1
            self.finish("idle_timeout")
        else:
            self.connections.idle.file(self, deadline)

    # -- draining (reload, shutdown) ---------------------------------------------------------

    def start_draining(self, timeout: float) -> None:
        """Keep flowing, but close when ``timeout`` has passed (the first deadline holds)."""
        if self._drain_timer is None and not self.closed:
            self._drain_timer = self.loop.call_later(timeout, self.finish, "drain_timeout")

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
        if self.pumps is not None:
            for pump in self.pumps:
                if pump is not None:
                    pump.close()
        attempt = self.trying
        if attempt is not None:
            self.trying = None
            attempt.abandon()
        if self.header is not None:
            self.header.close()
        self.connections.idle.remove(self)
        for timer in (self._drain_timer, self._half_closed_timer, self.max_duration_timer):
            if timer is not None:
                timer.cancel()
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
            endpoint.stats.upstream_bytes_sent_total += self.received
            endpoint.stats.upstream_bytes_received_total += self.sent
        if self.admission is not None:
            queued, self.admission = self.admission == "queued", None
            if route.admission is not None:
                route.admission.quit(self, queued)
        stats = route.stats
        stats.downstream_cx_active -= 1
        stats.downstream_bytes_received_total += self.received
        stats.downstream_bytes_sent_total += self.sent
        stats.downstream_cx_length_seconds.observe(self.loop.time() - self.started)
        self.connections.discard(self)
        if route.tunables.access_log:
            log_closed(self, self.upstream.endpoint if self.upstream else None, reason)
        # No reference cycle outlives the connection (client and endpoint halves, transports,
        # timers): refcounting frees it at once, and the cyclic GC never has to look at it.
        self.upstream = None
        self.transport = None
        self.pumps = None
        self._drain_timer = self._half_closed_timer = self.max_duration_timer = None
