"""The TCP data path: a pair of socket halves per proxied connection.

``Downstream`` (here) is the client half and owns the connection's lifetime; ``Upstream``
(``lbd.net.tcp_upstream``) is the endpoint half. Before bytes flow, a connection goes through
its accept phase (``lbd.net.tcp_accept``: source ranges, PROXY header, admission) and its
connect tries (``lbd.net.connect``); its end is recorded by ``lbd.net.tcp_end``.

Both sockets are plain non-blocking sockets in the worker's ``Reactor`` (one epoll set; see
there why not the event loop's transports). Flow control is cross-coupled: what one side's
socket cannot take is kept (``lbd.net.tcp_socket``) and the *other* side is not read until it
has gone, so a slow reader never makes lbd hold more than one read per direction. EOF is
passed on as a half-close (``shutdown(SHUT_WR)``, once the kept bytes went), so the other
direction keeps flowing until it finishes too. A reset is passed on as a reset (SO_LINGER 0).
"""

from __future__ import annotations

import _socket
import asyncio

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.net import connect, tcp_accept, tcp_end
from lbd.net.connect import ConnectTry
from lbd.net.connections import ConnectionSet, ListenerView, connection_id, next_serial
from lbd.net.idle import Idler
from lbd.net.proxy_protocol import Address, HeaderReader
from lbd.net.reactor import HANGUP, READABLE, WRITABLE
from lbd.net.splice import BULK_READ, SplicePump, switch_to_splice
from lbd.net.tcp_socket import DONTWAIT, READ_SIZE, VIEW, SocketWriter, set_reset
from lbd.net.tcp_upstream import ROUNDS, Upstream


class Downstream(SocketWriter):
    """The client side of a proxied connection; owns the connection's lifetime."""

    __slots__ = (
        "_drain_timer",
        "_half_closed_at",
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
        "pending",
        "pumps",
        "reactor",
        "reading",
        "received",
        "route",
        "sent",
        "started",
        "trying",
        "upstream",
        "upstream_eof",
    )

    def __init__(
        self,
        connections: ConnectionSet[Downstream],
        listener: ListenerView,
        sock: _socket.socket,
        peer: tuple[str, int] | tuple[str, int, int, int],
    ) -> None:
        """A connection the listener just accepted (``sock``, from ``peer``): watched from
        now on, and through its accept phase at once."""
        self.sock: _socket.socket | None = sock
        self.out, self.out_eof = None, False
        self.listener = listener
        self.route = route = listener.route  # kept for the connection's life, even if re-pointed
        self.connections = connections
        self.loop = loop = listener.loop
        self.reactor = reactor = listener.reactor
        self.upstream: Upstream | None = None
        self.endpoint: UpstreamEndpoint | None = None
        # Bytes that arrived before the upstream existed; None (not an empty list) the rest of
        # the time: one object less per idle connection.
        self.pending: list[bytes] | None = None
        self.trying: ConnectTry | None = None  # the connect try in flight (lbd.net.connect)
        self.idle_bucket: set[Idler] | None = None  # where the idle wheel filed it (lbd.net.idle)
        self._drain_timer: asyncio.TimerHandle | None = None
        self._half_closed_at = 0.0  # when one side finished (0: neither has)
        self.max_duration_timer: asyncio.TimerHandle | None = None
        # "queued" or "admitted" while this connection is in its route's Admission.
        self.admission: str | None = None
        # PROXY protocol: a trusted client's header, while it is still being read.
        self.header: HeaderReader | None = None
        # (client, destination) as a trusted PROXY header said; else the socket's own.
        self.addresses: tuple[Address, Address] | None = None
        self.client, self.client_port = peer[0], peer[1]  # the port: for hashOn: clientIPPort
        self.client_eof = self.upstream_eof = self.closed = False
        self.reading = True  # False while the upstream holds bytes it could not send yet
        self.received = 0  # bytes from the client
        self.sent = 0  # bytes from the upstream, written to the client
        self.started = self.last_activity = loop.time()
        self._serial = 0  # numbered when first logged (see ``id``): no int object per connection
        # [upward, downward] splice pumps once a direction went bulk (lbd.net.splice).
        self.pumps: list[SplicePump | None] | None = None
        route.stats.downstream_cx_total += 1
        reactor.add(sock.fileno(), self.on_event)
        tcp_accept.accepted(self)

    @property
    def id(self) -> str:
        """The connection id in logs: numbered the first time something is logged about the
        connection, then the same on every later line."""
        if not self._serial:
            self._serial = next_serial()
        return connection_id(self._serial)

    def reject(self) -> None:
        """Refuse a connection in its accept phase: reset it, nothing else to release."""
        self.closed = True
        sock = self.sock
        if sock is not None:
            set_reset(sock)
            self.reactor.close(sock)
            self.sock = None

    def track(self) -> None:
        self.route.stats.downstream_cx_active += 1
        self.connections.add(self)

    def untrack(self) -> None:
        self.connections.discard(self)

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

    def local_address(self) -> str | None:
        """The address the client connected to (a system call: not on the hot path)."""
        try:
            return str(self.sock.getsockname()[0]) if self.sock is not None else None
        except OSError:
            return None

    # -- the client socket (Reactor events) ----------------------------------------------------

    def on_event(self, events: int) -> None:
        if events & WRITABLE and self.out is not None:
            try:
                drained = self.flush()
            except OSError:
                self.finish("client_reset", abort=True)
                return
            if drained:
                self.client_drained()
        if events & READABLE:
            self.read(events & HANGUP != 0)

    def read(self, drain: bool = True) -> None:
        """Read and pass it upstream, as ``Upstream.read`` does the other way."""
        sock = self.sock
        for _ in range(ROUNDS):
            if not self.reading or self.client_eof or self.closed:
                return
            assert sock is not None
            try:
                count = sock.recv_into(VIEW, READ_SIZE, DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.finish("client_reset", abort=True)
                return
            if not count:
                self.client_eof = True
                if self.header is not None:
                    tcp_accept.bad_header(self, "closed before the header ended")
                else:
                    self.client_ended()
                return
            header = self.header
            if header is not None:
                tcp_accept.feed_header(self, header, bytes(VIEW[:count]))
            else:
                self.received += count
                self.last_activity = self.loop.time()
                upstream = self.upstream
                if upstream is None:
                    tcp_accept.keep(self, bytes(VIEW[:count]))
                else:
                    try:
                        whole = upstream.send(VIEW[:count])
                    except OSError:
                        self.finish("upstream_reset", abort=True)
                        return
                    if not whole:
                        self.reading = False  # until the upstream took it: upstream_drained
                        return
                    if count >= BULK_READ:
                        self.splice(True)
            if count < READ_SIZE and not drain:
                return
        self.loop.call_soon(self.read)  # more may be queued: after the loop's other work

    def upstream_drained(self) -> None:
        """The upstream took what it held: the client may be read again."""
        if not self.spliced(True):
            self.reading = True
            self.read()
        self._maybe_completed()

    def client_drained(self) -> None:
        """The client took what it held: the upstream may be read again."""
        upstream = self.upstream
        if upstream is not None and not self.spliced(False):
            upstream.resume()
        self._maybe_completed()

    def client_ended(self) -> None:
        """The client finished sending (FIN): pass the half-close on."""
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None:
            if self.upstream_eof:
                if upstream.out is not None:
                    upstream.write_eof()
                self._maybe_completed()  # else the close sends the FIN: no shutdown needed
                return
            upstream.write_eof()
        self.half_closed()

    def upstream_ended(self) -> None:
        """The endpoint finished sending (FIN): pass the half-close on."""
        self.upstream_eof = True
        if not self.client_eof:
            self.write_eof()
            self.half_closed()
            return
        if self.out is not None:
            self.write_eof()
        self._maybe_completed()  # else the close sends the FIN: no shutdown needed

    def _maybe_completed(self) -> None:
        """Both sides finished and everything kept was sent: the connection is complete."""
        upstream = self.upstream
        if (
            self.client_eof
            and self.upstream_eof
            and self.out is None
            and upstream is not None
            and upstream.out is None
            and not self.closed
        ):
            self.finish("completed")

    def half_closed(self) -> None:
        """One side finished: the other gets ``halfClosedTimeout`` to finish too (a deadline
        in the idle wheel, not a timer: most connections end right after)."""
        if self._half_closed_at or self.closed:
            return
        self._half_closed_at = self.loop.time()
        self.file_idle()

    def file_idle(self) -> None:
        """File the connection in the idle wheel under its next deadline."""
        tunables = self.route.tunables
        deadline = self.last_activity + tunables.idle_timeout
        if self._half_closed_at:
            deadline = min(deadline, self._half_closed_at + tunables.half_closed_timeout)
        self.connections.idle.file(self, deadline)

    def max_duration_reached(self) -> None:
        self.route.stats.downstream_cx_max_duration_reached_total += 1
        self.finish("max_duration")

    # -- splice (lbd.net.splice) ----------------------------------------------------------------

    def spliced(self, upward: bool) -> bool:
        """This direction moves by splice: its source is not read here."""
        pumps = self.pumps
        return pumps is not None and pumps[0 if upward else 1] is not None

    def splice(self, upward: bool) -> None:
        """A bulk read in this direction: move it with splice(2) from now on (lbd.net.splice)."""
        upstream = self.upstream
        if upstream is None or self.closed or self.route.tunables.splice == "off":
            return
        if self.pumps is None:
            self.pumps = [None, None]
        source, destination = (self, upstream) if upward else (upstream, self)
        switch_to_splice(self.loop, source, destination, self, self.pumps, upward, self.route.stats)

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
        """Drop (and reset) the upstream half: its endpoint failed before any byte passed."""
        upstream, self.upstream, self.endpoint = self.upstream, None, None
        if upstream is not None:
            upstream.close(abort=True)
        self.connections.idle.remove(self)

    def check_idle(self) -> None:
        """Called by the idle wheel when the deadline this connection was filed under passed."""
        if self.closed:
            return
        now = self.loop.time()
        tunables = self.route.tunables
        stats = self.route.stats
        half_closed = self._half_closed_at
        if half_closed and now >= half_closed + tunables.half_closed_timeout:
            stats.downstream_cx_half_closed_timeout_total += 1
            self.finish("half_closed_timeout")
            return
        if now >= self.last_activity + tunables.idle_timeout:
            stats.downstream_cx_idle_timeout_total += 1
            self.finish("idle_timeout")
            return
        self.file_idle()

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
        for timer in (self._drain_timer, self.max_duration_timer):
            if timer is not None:
                timer.cancel()
        sock = self.sock
        if sock is not None:
            if abort:
                set_reset(sock)
            self.reactor.close(sock)
        if self.upstream is not None:
            self.upstream.close(abort)
        tcp_end.account(self, reason)
        # No reference cycle outlives the connection (client and endpoint halves, bound
        # methods in the reactor, timers): refcounting frees it at once, and the cyclic GC
        # never has to look at it.
        self.upstream = self.sock = self.pumps = None
        self._drain_timer = self.max_duration_timer = None
