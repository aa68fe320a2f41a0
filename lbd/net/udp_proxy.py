"""The UDP data path: per-client sessions behind one listening socket.

A session is one client address (on a wildcard listener: client address and the local address
it sent to) bound to one endpoint through one connected upstream socket. The first datagram
picks the endpoint; later datagrams and every reply use the same socket; replies leave through
the listener socket from exactly the address and port the client sent to, so a client with a
connected socket accepts them.

Sockets are driven by ``add_reader`` and plain non-blocking calls, not DatagramTransports:
- a wildcard listener needs recvmsg/sendmsg with IP_PKTINFO, which transports do not expose;
- a session must exist the moment its first datagram arrives; ``create_datagram_endpoint`` is
  a coroutine (a Task per session, and a queue for the datagrams that arrive meanwhile);
- UDP's answer to a full buffer is to drop and count; a transport would queue instead;
- one wakeup reads a batch and updates the counters once.

No endpoint: the listener closes its socket, so the kernel itself answers ICMP port
unreachable (a connected client gets ECONNREFUSED) exactly as for a closed port, with no raw
socket and no privilege; the socket is bound again the moment an endpoint is eligible.
Sessions follow the pool (``Pool.watch``): a session whose endpoint leaves the eligible set
ends at once, so the client's next datagram picks a live endpoint.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

import structlog

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route
from lbd.net import proxy_protocol
from lbd.net.follow import PoolFollower
from lbd.net.sockets import IP_PKTINFO, bind_udp_listener

log = structlog.get_logger("lbd.udp")

MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4

RECV_SIZE = 65536  # above the largest UDP payload: 65,507 bytes over IPv4, 65,527 over IPv6
BATCH = 64  # datagrams read per wakeup: one busy socket cannot hold the loop for long
# Per session: room for a few maximum-size datagrams, not more (65,536 sessions times this).
SESSION_BUFFER = 256 * 1024
REBIND_RETRY_S = 1.0
# Errors a connected UDP socket reports for an ICMP error from its peer.
ICMP_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE, errno.EPROTO}
)
_ANC_SIZE = socket.CMSG_SPACE(20)  # in6_pktinfo (20 bytes) is the larger of the two

Client = tuple[str, int] | tuple[str, int, int, int]
Ancillary = list[tuple[int, int, bytes]]


class UdpListener(PoolFollower):
    """One UDP socket of a service port (one listener kind and address) and its sessions."""

    __slots__ = (
        "_anc_level",
        "_anc_type",
        "_loop",
        "_rebind",
        "_view",
        "address",
        "closed",
        "external",
        "filtered",
        "port",
        "reuse_port",
        "route",
        "sessions",
        "sock",
        "wildcard",
    )

    def __init__(
        self,
        address: str,
        port: int,
        route: Route,
        external: bool = False,
        filtered: bool = False,
        reuse_port: bool = False,
    ) -> None:
        self.address = address
        self.external = external  # not a clusterIP listener: externalTrafficPolicy applies
        self.filtered = filtered  # loadBalancerSourceRanges apply
        self.reuse_port = reuse_port  # several workers: each binds its own, the kernel hashes
        self.port = port  # 0 until the first bind resolves it; re-binds reuse it
        self.route = route
        self.sock: socket.socket | None = None
        self.sessions: dict[object, UdpSession] = {}
        self.wildcard = address in ("0.0.0.0", "::")
        v6 = ":" in address
        self._anc_level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
        self._anc_type = socket.IPV6_PKTINFO if v6 else IP_PKTINFO
        # One receive buffer per listener, shared by its sessions: every datagram is sent on
        # before the next is read, so nothing in it outlives one callback.
        self._view = memoryview(bytearray(RECV_SIZE))
        self._rebind: asyncio.TimerHandle | None = None
        self._unwatch = None  # lbd.net.follow
        self.closed = False

    @property
    def bound(self) -> tuple[str, int]:
        return self.address, self.port

    def bind(self) -> None:
        """Bind the socket (raises OSError) and resolve port 0; nothing is read yet. A reload
        binds every new listener first, so a failure can still change nothing."""
        self._loop = asyncio.get_running_loop()
        sock = bind_udp_listener(self.address, self.port, reuse_port=self.reuse_port)
        self.port = sock.getsockname()[1]
        self.sock = sock

    def start(self) -> None:
        """Start reading and follow the pool. With no eligible endpoint the socket is closed
        again at once (after port 0 has been resolved): the kernel then refuses for us."""
        if self.sock is None:
            self.bind()
        self._add_reader()
        self._follow()
        if not self.route.pool.eligible(self.external):
            self._shut()

    def repoint(self, route: Route, external: bool = False, filtered: bool = False) -> None:
        """A reload gave this socket to another service port: its sessions (to the old port's
        endpoints) end, and the listener follows the new pool."""
        self._unfollow()
        for session in list(self.sessions.values()):
            session.finish("endpoint_gone")
        self.external = external
        self.filtered = filtered
        self.route = route
        self._follow()
        self._pool_changed(route.pool)

    def close(self) -> None:
        """End every session and close the socket; the listener is done."""
        if self.closed:
            return
        self.closed = True
        self._unfollow()
        for session in list(self.sessions.values()):
            session.finish("shutdown")
        self._shut()

    # -- the socket follows the pool -------------------------------------------------------

    def _open(self) -> None:
        self.bind()
        self._add_reader()

    def _add_reader(self) -> None:
        assert self.sock is not None
        reader = self._on_readable_pktinfo if self.wildcard else self._on_readable
        self._loop.add_reader(self.sock.fileno(), reader)

    def _shut(self) -> None:
        if self._rebind is not None:
            self._rebind.cancel()
            self._rebind = None
        sock = self.sock
        if sock is not None:
            self.sock = None
            self._loop.remove_reader(sock.fileno())
            sock.close()

    def _pool_changed(self, pool: Pool) -> None:
        if self.closed:
            return
        eligible = pool.eligible(self.external)
        if self.sessions:
            live = set(eligible)
            stale = [s for s in self.sessions.values() if s.endpoint not in live]
            self.route.stats.udp_sess_ended_total.endpoint_gone += len(stale)
            for session in stale:
                session.finish("endpoint_gone")
        if not eligible:
            if self.sock is not None:
                log.info(
                    "udp listener closed: no endpoint, the kernel answers port unreachable",
                    listener=f"{self.address}:{self.port}",
                    route=self.route.label,
                )
            self._shut()
        elif self.sock is None and self._rebind is None:
            self._try_open()

    def _try_open(self) -> None:
        self._rebind = None
        if self.closed or self.sock is not None or not self.route.pool.eligible(self.external):
            return
        try:
            self._open()
        except OSError as error:
            # Someone else took the port while it was closed: keep trying, say so, count it.
            self.route.stats.listener_rebind_failures_total.UDP += 1
            log.warning(
                "udp listener re-bind failed",
                listener=f"{self.address}:{self.port}",
                route=self.route.label,
                error=error.strerror or str(error),
            )
            self._rebind = self._loop.call_later(REBIND_RETRY_S, self._try_open)
            return
        log.info(
            "udp listener open", listener=f"{self.address}:{self.port}", route=self.route.label
        )

    # -- client → endpoint -------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        view = self._view
        sessions = self.sessions
        received = nbytes = 0
        for _ in range(BATCH):
            try:
                n, client = sock.recvfrom_into(view)
            except BlockingIOError:
                break
            except OSError:
                self.route.stats.udp_errors_total.downstream_rx += 1
                break
            received += 1
            nbytes += n
            session = sessions.get(client)
            if session is None or not session.forward(view[:n]):
                session = self._open_session(client, client, None)
                if session is not None:
                    session.forward(view[:n])
        self._count(received, nbytes)

    def _on_readable_pktinfo(self) -> None:
        """A wildcard listener: the key and the reply's source come from IP_PKTINFO."""
        sock = self.sock
        if sock is None:
            return
        view = self._view
        sessions = self.sessions
        received = nbytes = 0
        for _ in range(BATCH):
            try:
                n, ancdata, _flags, client = sock.recvmsg_into([view], _ANC_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self.route.stats.udp_errors_total.downstream_rx += 1
                break
            received += 1
            nbytes += n
            local = self._local_address(ancdata)
            key = (client, local)
            session = sessions.get(key)
            if session is None or not session.forward(view[:n]):
                session = self._open_session(key, client, self._reply_ancillary(local))
                if session is not None:
                    session.forward(view[:n])
        self._count(received, nbytes)

    def _local_address(self, ancdata: list[tuple[int, int, bytes]]) -> bytes:
        for level, kind, data in ancdata:
            if level == self._anc_level and kind == self._anc_type:
                # in_pktinfo: ifindex, spec_dst, addr (the header's destination);
                # in6_pktinfo: addr, ifindex.
                return data[8:12] if level == socket.IPPROTO_IP else data[:16]
        return b""

    def _reply_ancillary(self, local: bytes) -> Ancillary | None:
        if not local:
            return None  # no PKTINFO (should not happen): the kernel picks the source
        if self._anc_level == socket.IPPROTO_IP:
            return [(self._anc_level, self._anc_type, struct.pack("=i4s4s", 0, local, local))]
        return [(self._anc_level, self._anc_type, local + struct.pack("=I", 0))]

    def _count(self, received: int, nbytes: int) -> None:
        stats = self.route.stats
        stats.udp_downstream_datagrams_received_total += received
        stats.udp_downstream_bytes_received_total += nbytes

    def _destination(self, key: object) -> tuple[str, int]:
        """The address the client sent to: the listener's, or (wildcard) the one PKTINFO gave."""
        if self.wildcard and isinstance(key, tuple) and len(key) == 2 and key[1]:
            family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
            return socket.inet_ntop(family, key[1]), self.port
        return self.address, self.port

    def _open_session(
        self, key: object, client: Client, ancillary: Ancillary | None
    ) -> UdpSession | None:
        """A new session for ``client``, or None (counted) when the datagram must be dropped."""
        route = self.route
        stats = route.stats
        if stats.udp_sess_active >= route.tunables.max_udp_sessions:
            stats.udp_sess_dropped_total.overflow += 1
            if stats.udp_sess_dropped_total.overflow == 1:
                log.warning(
                    "udp sessions at maxUdpSessions, new clients dropped",
                    route=route.label,
                    max_udp_sessions=route.tunables.max_udp_sessions,
                )
            return None
        if self.filtered and not route.allows(client[0]):
            stats.udp_sess_dropped_total.source_range += (
                1  # dropped: no ICMP per client without raw sockets
            )
            return None
        endpoint = route.pick(route.pool.eligible(self.external), client[0], self._loop.time())
        if endpoint is None:
            stats.udp_sess_dropped_total.no_endpoint += 1
            return None
        try:
            sock = _connect_upstream(endpoint)
        except OSError as error:
            stats.udp_sess_dropped_total.create_fail += 1
            log.warning(
                "udp session failed",
                route=route.label,
                endpoint=str(endpoint),
                error=error.strerror or str(error),
            )
            return None
        header = None
        if route.tunables.proxy_protocol == "v2":
            header = proxy_protocol.build_v2(client[:2], self._destination(key), "UDP")
        session = UdpSession(self, key, client, endpoint, sock, ancillary, header)
        self.sessions[key] = session
        route.pool.acquire(endpoint)
        stats.udp_sess_total += 1
        stats.udp_sess_active += 1
        self._loop.add_reader(sock.fileno(), session.on_readable)
        return session


def _connect_upstream(endpoint: UpstreamEndpoint) -> socket.socket:
    sock = socket.socket(endpoint.family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SESSION_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SESSION_BUFFER)
        # Connected: the kernel filters replies to this endpoint and reports its ICMP errors.
        sock.connect((endpoint.address, endpoint.port))
    except OSError:
        sock.close()
        raise
    return sock


class UdpSession:
    """One client of one listener, bound to one endpoint through one connected socket."""

    __slots__ = (
        "_timer",
        "ancillary",
        "client",
        "closed",
        "endpoint",
        "header",
        "key",
        "last_activity",
        "listener",
        "sock",
    )

    def __init__(
        self,
        listener: UdpListener,
        key: object,
        client: Client,
        endpoint: UpstreamEndpoint,
        sock: socket.socket,
        ancillary: Ancillary | None,
        header: bytes | None = None,
    ) -> None:
        self.listener = listener
        # PROXY protocol v2 (proxyProtocol: v2): sent before every datagram, since each one may
        # reach the endpoint on its own, as HAProxy's and AWS NLB's UDP proxies do.
        self.header = header
        self.key = key
        self.client = client
        self.endpoint = endpoint
        self.sock = sock
        self.ancillary = ancillary  # IP_PKTINFO for the reply's source (wildcard listeners)
        self.closed = False
        loop = listener._loop
        self.last_activity = loop.time()
        timeout = listener.route.tunables.udp_idle_timeout
        self._timer = loop.call_at(self.last_activity + timeout, self._check_idle)

    def forward(self, data: memoryview) -> bool:
        """Send one client datagram to the endpoint. False: the session has ended (an earlier
        ICMP error) and the datagram was not sent; the caller may open a new session."""
        listener = self.listener
        self.last_activity = listener._loop.time()
        try:
            if self.header is None:
                self.sock.send(data)
            elif len(self.header) + len(data) > MAX_DATAGRAM:
                listener.route.stats.udp_errors_total.upstream_tx += 1  # no room for the header
                return True
            else:
                self.sock.sendmsg([self.header, data])  # no copy to prepend it
        except BlockingIOError:
            listener.route.stats.udp_errors_total.upstream_tx += 1  # send buffer full: dropped
            return True
        except OSError as error:
            self._upstream_error(error)
            return self.closed is False
        listener.route.stats.udp_upstream_datagrams_sent_total += 1
        return True

    def on_readable(self) -> None:
        """Endpoint → client: each reply leaves through the listener socket."""
        listener = self.listener
        out = listener.sock
        if self.closed or out is None:
            return
        view = listener._view
        sock = self.sock
        client = self.client
        ancillary = self.ancillary
        received = nbytes = sent = 0
        for _ in range(BATCH):
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                break
            except OSError as error:
                self._upstream_error(error, reading=True)
                break
            received += 1
            nbytes += n
            try:
                if ancillary is None:
                    out.sendto(view[:n], client)
                else:
                    out.sendmsg([view[:n]], ancillary, 0, client)
            except OSError:
                # Full send buffer (EAGAIN, ENOBUFS) or the client vanished: this reply is
                # dropped, as the network would; the session and listener go on.
                listener.route.stats.udp_errors_total.downstream_tx += 1
                continue
            sent += 1
        if received:
            self.last_activity = listener._loop.time()
            stats = listener.route.stats
            stats.udp_upstream_datagrams_received_total += received
            stats.udp_upstream_bytes_received_total += nbytes
            stats.udp_downstream_datagrams_sent_total += sent

    def _upstream_error(self, error: OSError, *, reading: bool = False) -> None:
        stats = self.listener.route.stats
        if error.errno in ICMP_ERRNOS:
            # The endpoint (or the path to it) refused: end the session so the client's next
            # datagram picks again, instead of pinning it to a dead endpoint until idle.
            stats.udp_errors_total.upstream_icmp += 1
            self.finish("upstream_unreachable")
        elif reading:
            # Any other receive error would repeat on every wakeup: end the session.
            stats.udp_errors_total.upstream_rx += 1
            self.finish("upstream_error")
        else:
            stats.udp_errors_total.upstream_tx += 1  # e.g. ENOBUFS or a firewall's EPERM: dropped

    def _check_idle(self) -> None:
        listener = self.listener
        deadline = self.last_activity + listener.route.tunables.udp_idle_timeout
        if listener._loop.time() >= deadline:
            listener.route.stats.udp_sess_ended_total.idle_timeout += 1
            self.finish("idle_timeout")
        else:
            self._timer = listener._loop.call_at(deadline, self._check_idle)

    def finish(self, reason: str) -> None:
        """End the session once: stop reading, close the socket, release the endpoint."""
        if self.closed:
            return
        self.closed = True
        listener = self.listener
        self._timer.cancel()
        listener._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if listener.sessions.get(self.key) is self:
            del listener.sessions[self.key]
        route = listener.route
        route.pool.release(self.endpoint)
        route.stats.udp_sess_active -= 1
        if route.tunables.access_log:
            log.info(
                "udp session closed",
                service=f"{route.namespace}/{route.service}",
                port=route.port_name,
                client=f"{self.client[0]}:{self.client[1]}",
                endpoint=str(self.endpoint),
                end=reason,
            )
