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
import ipaddress
import itertools
import os
import socket
import struct
from typing import TYPE_CHECKING, Protocol, cast

import structlog

from lbd.endpoints.route import Route
from lbd.net import proxy_protocol
from lbd.net.connect import ConnectTry, UpstreamConnector
from lbd.net.proxy_protocol import Address
from lbd.net.splice import BULK_READ, SPLICE_AVAILABLE, SplicePump

if TYPE_CHECKING:
    from lbd.endpoints.endpoint import UpstreamEndpoint
    from lbd.net.connections import ConnectionSet
    from lbd.net.idle import Idler


class ListenerView(Protocol):
    """What a connection needs of the listener that accepted it."""

    route: Route
    removed: bool
    loop: asyncio.AbstractEventLoop  # passed in: asyncio.get_running_loop() costs a getpid()

    @property
    def external(self) -> bool: ...  # externalTrafficPolicy applies (not a clusterIP listener)

    @property
    def filtered(self) -> bool: ...  # loadBalancerSourceRanges apply


log = structlog.get_logger("lbd.tcp")

_LINGER_RESET = struct.pack("ii", 1, 0)
# A trusted client must send its PROXY header this soon (HAProxy's default is the client
# timeout; a header is one packet, so a few seconds is plenty).
PROXY_HEADER_TIMEOUT = 3.0
# Client bytes held while the upstream connect is in flight; past this, reading pauses.
PENDING_LIMIT = 16 * 1024  # as HAProxy's default buffer: bounded even for a full queue

# Connection ids: unique per process, and across the workers of one lbd (the pid is part of
# each), short enough to grep. Every log line about a connection carries its id.
_PID_PREFIX = f"{os.getpid():x}"
_next_id = itertools.count(1)


def send_reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST instead of a FIN, dropping anything still buffered."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # OSError: the socket is already gone, and abort() below is all that is left to do.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


class Downstream(UpstreamConnector, asyncio.Protocol):
    """The client side of a proxied connection; owns the connection's lifetime."""

    __slots__ = (
        "_drain_timer",
        "_half_closed_timer",
        "_header",
        "_header_timer",
        "_loop",
        "_max_duration_timer",
        "_pending",
        "_serial",
        "addresses",
        "admission",
        "client",
        "client_eof",
        "closed",
        "connections",
        "endpoint",
        "idle_bucket",
        "last_activity",
        "listener",
        "pumps",
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
        # Bytes that arrived before the upstream existed; None (not an empty list) the rest of
        # the time: one object less per idle connection.
        self._pending: list[bytes] | None = None
        self._trying: ConnectTry | None = None  # the connect try in flight
        self.idle_bucket: set[Idler] | None = None  # where the idle wheel filed it (lbd.net.idle)
        self._drain_timer: asyncio.TimerHandle | None = None
        self._half_closed_timer: asyncio.TimerHandle | None = None
        self._max_duration_timer: asyncio.TimerHandle | None = None
        # "queued" or "admitted" while this connection is in its route's Admission.
        self.admission: str | None = None
        # PROXY protocol: bytes of a header still being read from a trusted client.
        self._header: bytes | None = None
        self._header_timer: asyncio.TimerHandle | None = None
        # (client, destination) as a trusted PROXY header said; else the socket's own.
        self.addresses: tuple[Address, Address] | None = None
        self.client = ""
        self.client_eof = False
        self.upstream_eof = False
        self.closed = False
        self.received = 0  # bytes from the client
        self.sent = 0  # bytes from the upstream, written to the client
        self.started = 0.0
        self.last_activity = 0.0
        self._serial = 0  # numbered when first logged (see ``id``): no int object per connection
        # [upward, downward] splice pumps once a direction went bulk (lbd.net.splice).
        self.pumps: list[SplicePump | None] | None = None

    @property
    def id(self) -> str:
        """The connection id in logs: numbered the first time something is logged about the
        connection, then the same on every later line."""
        if not self._serial:
            self._serial = next(_next_id)
        return f"{_PID_PREFIX}-{self._serial:x}"

    def _keep(self, data: bytes) -> None:
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
        self._loop = loop = self.listener.loop
        self.started = self.last_activity = loop.time()
        route = self.route
        stats = route.stats
        stats.downstream_cx_total += 1
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        listener = self.listener
        # A trusted PROXY source is checked against the ranges once its header names the client.
        via_proxy = bool(route.trusted_proxies) and self._trusted(self.client)
        if listener.filtered and not via_proxy and not route.allows(self.client):
            # Refusing per client needs the connection accepted first: a reset is the best the
            # kernel lets a listening socket do without packet filtering.
            stats.downstream_cx_refused_total.source_range += 1
            self.closed = True
            send_reset(transport)
            return
        if not route.pool.eligible(listener.external):
            # Only in the moment before the listener stops listening (lbd.net.tcp_listener).
            stats.downstream_cx_refused_total.no_endpoint += 1
            self.closed = True
            send_reset(transport)
            return
        stats.downstream_cx_active += 1
        self.connections.add(self)
        if route.tunables.max_connection_duration is not None:
            self._max_duration_timer = loop.call_later(
                route.tunables.max_connection_duration, self._max_duration
            )
        if via_proxy:
            # Read the PROXY header first: it says who the client is, before any pick.
            self._header = b""
            self._header_timer = loop.call_later(PROXY_HEADER_TIMEOUT, self._header_missing)
            return
        self._admit()  # bytes that arrive before the upstream exists wait in _pending

    def _trusted(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:  # not an IP peer (cannot happen on TCP listeners)
            return False
        return any(address in network for network in self.route.trusted_proxies)

    def _read_header(self, data: bytes) -> None:
        assert self._header is not None
        buffer = self._header + data
        try:
            result = proxy_protocol.parse(buffer[: proxy_protocol.MAX_HEADER])
        except proxy_protocol.ProxyHeaderError as error:
            self._bad_header(str(error))
            return
        if isinstance(result, proxy_protocol.NeedMore):
            if len(buffer) >= proxy_protocol.MAX_HEADER:
                self._bad_header("header too long")
            else:
                self._header = buffer
            return
        length, source, destination = result
        self._header = None
        if self._header_timer is not None:
            self._header_timer.cancel()
        if source is not None and destination is not None:
            self.addresses = (source, destination)
            self.client = source[0]
        if self.listener.filtered and not self.route.allows(self.client):
            self.route.stats.downstream_cx_refused_total.source_range += 1
            self.finish("source_range", abort=True)
            return
        rest = buffer[length:]
        if rest:
            self.received += len(rest)
            self._keep(rest)
        self._admit()

    def _header_missing(self) -> None:
        self._bad_header("no header within the timeout")

    def _bad_header(self, why: str) -> None:
        self.route.stats.downstream_cx_refused_total.proxy_header_invalid += 1
        log.warning("PROXY header rejected", route=self.route.label, client=self.client, error=why)
        self.finish("proxy_header_invalid", abort=True)

    def _admit(self) -> None:
        route = self.route
        admission = route.admission
        if admission is not None:
            verdict = admission.request(self)
            if verdict is False:
                self.finish("overflow", abort=True)
                return
            if verdict is None:
                self.admission = "queued"
                return
            self.admission = "admitted"
        self._try_next([])

    def count_under_new_limits(self) -> None:
        """A reload gave this port limits while this connection was open: it takes a slot, as
        if it had been admitted under them. One still reading its PROXY header is admitted
        (or queued) when the header ends, as any new connection."""
        admission = self.route.admission
        if admission is None or self.admission is not None or self._header is not None:
            return  # no limits, already counted, or still to be admitted after its header
        if not self.closed:
            admission.adopt()
            self.admission = "admitted"

    @property
    def external(self) -> bool:
        """Accepted on an external listener (NodePort, LoadBalancer IP, external IP)."""
        return self.listener.external

    def admitted(self) -> None:
        """Called by the route's Admission when a queued connection gets its slot."""
        self.admission = "admitted"
        self._try_next([])

    def data_received(self, data: bytes) -> None:
        if self._header is not None:
            self._read_header(data)
            return
        self.received += len(data)
        self.last_activity = self._loop.time()
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)
            if len(data) >= BULK_READ:
                self.splice(True)
        else:
            self._keep(data)

    def eof_received(self) -> bool:
        if self._header is not None:
            self._bad_header("closed before the header ended")
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
            self._half_closed_timer = self._loop.call_later(timeout, self._half_closed_expired)

    def _half_closed_expired(self) -> None:
        self.route.stats.downstream_cx_half_closed_timeout_total += 1
        self.finish("half_closed_timeout")

    def _max_duration(self) -> None:
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
        if destination.get_write_buffer_size() or destination.is_closing():
            return
        try:
            pump = SplicePump(
                self._loop,
                source.get_extra_info("socket").fileno(),
                destination.get_extra_info("socket").fileno(),
                self,
                upward,
            )
        except OSError:
            self.route.stats.splice_fallbacks_total += 1
            return
        source.pause_reading()
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
        self.last_activity = self._loop.time()

    def pump_ended(self, upward: bool) -> None:
        if upward:
            self.client_ended()
        else:
            self.upstream_ended()

    def pump_failed(self, upward: bool, at_source: bool, error: OSError) -> None:
        client_failed = upward == at_source
        self.finish("client_reset" if client_failed else "upstream_reset", abort=True)

    # -- upstream connect (lbd.net.connect) -------------------------------------------------

    def new_upstream(self, endpoint: UpstreamEndpoint) -> Upstream:
        return Upstream(self, endpoint)

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
            transport.write(self._proxy_header(version))
        if self._pending:
            transport.write(b"".join(self._pending))
        self._pending = None
        if self.client_eof:
            transport.write_eof()
        else:
            assert self.transport is not None
            self.transport.resume_reading()
        self.connections.idle.file(self, self.last_activity + self.route.tunables.idle_timeout)

    def _proxy_header(self, version: str) -> bytes:
        addresses = self.addresses
        if addresses is None:
            assert self.transport is not None
            peer = self.transport.get_extra_info("peername")
            local = self.transport.get_extra_info("sockname")
            addresses = (peer[0], peer[1]), (local[0], local[1])
        if version == "v1":
            return proxy_protocol.build_v1(*addresses)
        return proxy_protocol.build_v2(*addresses, "TCP")

    def check_idle(self) -> None:
        """Called by the idle wheel when the deadline this connection was filed under passed."""
        if self.closed:
            return
        deadline = self.last_activity + self.route.tunables.idle_timeout
        if self._loop.time() >= deadline:
            self.route.stats.downstream_cx_idle_timeout_total += 1
            self.finish("idle_timeout")
        else:
            self.connections.idle.file(self, deadline)

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
        if self.pumps is not None:
            for pump in self.pumps:
                if pump is not None:
                    pump.close()
        attempt = self._trying
        if attempt is not None:
            self._trying = None
            if not attempt.upstream.attached and attempt.coro is not None:
                self._give_up(attempt)
                route.pool.release(attempt.upstream.endpoint)
        self.connections.idle.remove(self)
        for timer in (
            self._drain_timer,
            self._half_closed_timer,
            self._max_duration_timer,
            self._header_timer,
        ):
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
            self._leave_admission()
        stats = route.stats
        stats.downstream_cx_active -= 1
        stats.downstream_bytes_received_total += self.received
        stats.downstream_bytes_sent_total += self.sent
        stats.downstream_cx_length_seconds.observe(self._loop.time() - self.started)
        self.connections.discard(self)
        if route.tunables.access_log:
            self._log_access(reason)

    def _leave_admission(self) -> None:
        admission = self.route.admission
        queued = self.admission == "queued"
        self.admission = None
        if admission is not None:
            if queued:
                admission.leave(self)
            else:
                admission.release()

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

    __slots__ = ("attached", "downstream", "endpoint", "timed_out", "transport")

    def __init__(self, downstream: Downstream, endpoint: UpstreamEndpoint) -> None:
        self.downstream = downstream
        self.endpoint = endpoint
        self.attached = False  # the connection's upstream (a later try may not be)
        self.timed_out = False  # its try's deadline passed before it connected
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
        if len(data) >= BULK_READ:
            downstream.splice(False)

    def eof_received(self) -> bool:
        self.downstream.upstream_ended()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        downstream = self.downstream
        if self.attached and not downstream.closed:
            downstream.finish("upstream_reset" if exc else "upstream_closed", abort=exc is not None)

    def pause_writing(self) -> None:
        transport = self.downstream.transport
        if transport is not None:
            transport.pause_reading()

    def resume_writing(self) -> None:
        transport = self.downstream.transport
        if (
            transport is not None
            and not transport.is_closing()
            and not self.downstream.spliced(True)
        ):
            transport.resume_reading()
