"""The UDP data path: per-client sessions (``lbd.net.udp_session``) behind one listening socket.

A session is one client address (on a wildcard listener: client address and the local address
it sent to) bound to one endpoint through one connected upstream socket. The first datagram
picks the endpoint; later datagrams and every reply use the same socket; replies leave through
the listener socket from exactly the address and port the client sent to, so a client with a
connected socket accepts them.

Sockets are driven by the worker's ``Reactor`` (one epoll set) and plain non-blocking calls, not
DatagramTransports:
- a wildcard listener needs recvmsg/sendmsg with IP_PKTINFO, which transports do not expose;
- a session must exist the moment its first datagram arrives; ``create_datagram_endpoint`` is
  a coroutine (a Task per session, and a queue for the datagrams that arrive meanwhile);
- UDP's answer to a full buffer is to drop and count; a transport would queue instead;
- one wakeup reads a batch and updates the counters once.

No endpoint: the listener closes its socket (``lbd.net.listener``), so the kernel itself answers
ICMP port unreachable (a connected client gets ECONNREFUSED) exactly as for a closed port, with
no raw socket and no privilege; the socket is bound again the moment an endpoint is eligible.
Sessions follow the pool: a session whose endpoint leaves the eligible set ends at once, so the
client's next datagram picks a live endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import structlog

from lbd.endpoints.pool import Pool
from lbd.endpoints.route import Route
from lbd.net import proxy_protocol, udp_faults
from lbd.net.idle import IdleWheel
from lbd.net.listener import ListenerSocket
from lbd.net.reactor import LEVEL, Reactor
from lbd.net.sockets import IP_PKTINFO, bind_udp_listener
from lbd.net.udp_drain import UdpDrain
from lbd.net.udp_rate import SourceRate
from lbd.net.udp_session import Ancillary, Client, UdpSession, connect_upstream, next_batch

log = structlog.get_logger("lbd.udp")

RECV_SIZE = 65536  # above the largest UDP payload: 65,507 bytes over IPv4, 65,527 over IPv6
_ANC_SIZE = socket.CMSG_SPACE(20)  # in6_pktinfo (20 bytes) is the larger of the two


class UdpListener:
    """One UDP socket of a service port (one listener kind and address) and its sessions."""

    __slots__ = (
        "_anc_level",
        "_anc_type",
        "_inherited",
        "batch",
        "filtered",
        "idle",
        "loop",
        "rates",
        "reactor",
        "reuse_port",
        "sessions",
        "sock",
        "socket",
        "view",
        "wildcard",
    )

    def __init__(
        self,
        address: str,
        port: int,
        route: Route,
        *,
        external: bool = False,
        filtered: bool = False,
        reuse_port: bool = False,
        inherited: socket.socket | None = None,
    ) -> None:
        """``inherited``: a socket bound elsewhere (the lbd this one took over from, and with
        workers its worker of the same index), used instead of binding."""
        self.socket = ListenerSocket(self, "UDP", address, port, route, external)
        self._inherited = inherited
        self.filtered = filtered  # loadBalancerSourceRanges apply
        self.reuse_port = reuse_port  # several workers: each binds its own, the kernel hashes
        self.sock: socket.socket | None = None
        self.sessions: dict[object, UdpSession] = {}
        self.wildcard = address in ("0.0.0.0", "::")
        v6 = ":" in address
        self._anc_level = socket.IPPROTO_IPV6 if v6 else socket.IPPROTO_IP
        self._anc_type = socket.IPV6_PKTINFO if v6 else IP_PKTINFO
        # One receive buffer per listener, shared by its sessions: every datagram is sent on
        # before the next is read, so nothing in it outlives one callback.
        self.view = memoryview(bytearray(RECV_SIZE))
        self.idle = IdleWheel()  # the sessions' idle deadlines, one timer for all
        self.batch = 1  # datagrams read at the next wakeup (next_batch)
        self.rates: SourceRate | None = None  # udpSessionRate's buckets, from its first use
        self.loop: asyncio.AbstractEventLoop
        self.reactor: Reactor  # the socket and every session's socket are watched here

    @property
    def route(self) -> Route:
        return self.socket.route

    @property
    def external(self) -> bool:
        return self.socket.external

    @property
    def bound(self) -> tuple[str, int]:
        return self.socket.address, self.socket.port

    def sockets(self) -> list[socket.socket]:
        return [] if self.sock is None else [self.sock]

    @property
    def removed(self) -> bool:
        return self.socket.closed

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    async def prepare(self) -> None:
        """Bind the socket (raises OSError) and resolve port 0; nothing is read yet. A reload
        binds every new listener first, so a failure can still change nothing."""
        self.loop = self.socket.loop = asyncio.get_running_loop()
        sock, self._inherited = self._inherited, None
        self.sock = sock if sock is not None else self._bind()
        self.socket.port = self.sock.getsockname()[1]

    async def start(self) -> None:
        """Start reading and follow the pool. With no eligible endpoint the socket is closed
        again at once (after port 0 has been resolved): the kernel then refuses for us."""
        if self.sock is None:
            self.sock = self._bind()
        self._add_reader(self.sock)
        self.socket.follow(self.route, self.external)

    def repoint(self, route: Route, external: bool, filtered: bool) -> None:
        """A reload gave this socket to another service port: its sessions (to the old port's
        endpoints) end, and the listener follows the new pool."""
        for session in list(self.sessions.values()):
            session.finish("endpoint_gone")
        self.filtered = filtered
        self.socket.follow(route, external)

    def close(self) -> None:
        """End every session and close the socket; the listener is done."""
        if self.socket.closed:
            return
        for session in list(self.sessions.values()):
            session.finish("shutdown")
        self.socket.close()

    def hand_over(self) -> UdpDrain | None:
        """A successor reads this socket now (a seamless restart): stop reading it, and let
        the sessions finish in a ``UdpDrain``, which keeps the socket for their replies. The
        listener is then as good as closed (``close`` follows). None when it has no socket."""
        sock, self.sock = self.sock, None
        if sock is None:
            return None
        self.reactor.remove(sock.fileno())  # no longer read here
        sessions, self.sessions = self.sessions, {}
        return UdpDrain(self, sock, sessions)

    # -- SocketHandler: the ListenerSocket opens and shuts the socket --------------------------

    def open(self) -> None:
        sock = self._bind()
        self.sock = sock
        self._add_reader(sock)

    def shut(self) -> None:
        sock = self.sock
        if sock is not None:
            self.sock = None
            self.reactor.remove(sock.fileno())
            sock.close()

    def pool_changed(self, pool: Pool) -> None:
        if not self.sessions:
            return
        live = set(pool.eligible(self.external))
        stale = [s for s in self.sessions.values() if s.endpoint not in live]
        self.route.stats.udp_sess_ended_total.endpoint_gone += len(stale)
        for session in stale:
            session.finish("endpoint_gone")

    def _bind(self) -> socket.socket:
        address, port = self.bound
        return bind_udp_listener(address, port, reuse_port=self.reuse_port)

    def _add_reader(self, sock: socket.socket) -> None:
        # The loop's reactor closes while it watches nothing: ask for it each time.
        self.reactor = Reactor.of(self.loop)
        reader = self._on_readable_pktinfo if self.wildcard else self._on_readable
        self.reactor.add(sock.fileno(), reader, LEVEL)

    # -- client → endpoint -------------------------------------------------------------------

    def _on_readable(self, events: int = 0) -> None:
        sock = self.sock
        if sock is None:
            return
        view = self.view
        sessions = self.sessions
        received = nbytes = 0
        dry = False
        for _ in range(self.batch):
            try:
                n, client = sock.recvfrom_into(view)
            except BlockingIOError:
                dry = True
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
        self.batch = next_batch(self.batch, received, dry)
        self._count(received, nbytes)

    def _on_readable_pktinfo(self, events: int = 0) -> None:
        """A wildcard listener: the key and the reply's source come from IP_PKTINFO."""
        sock = self.sock
        if sock is None:
            return
        view = self.view
        sessions = self.sessions
        received = nbytes = 0
        dry = False
        for _ in range(self.batch):
            try:
                n, ancdata, _flags, client = sock.recvmsg_into([view], _ANC_SIZE)
            except BlockingIOError:
                dry = True
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
        self.batch = next_batch(self.batch, received, dry)
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
            address, port = self.bound
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            return socket.inet_ntop(family, key[1]), port
        return self.bound

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
            # Dropped: no ICMP per client without raw sockets.
            stats.udp_sess_dropped_total.source_range += 1
            return None
        rate = route.tunables.udp_session_rate
        if rate is not None:
            rates = self.rates
            if rates is None:
                rates = self.rates = SourceRate()
            if not rates.allow(client[0], rate, self.loop.time()):
                stats.udp_sess_dropped_total.rate += 1
                return None
        eligible = route.pool.eligible(self.external)
        endpoint = route.pick(eligible, client[0], self.loop.time(), (), client[1])
        if endpoint is None:
            stats.udp_sess_dropped_total.no_endpoint += 1
            return None
        try:
            sock = connect_upstream(endpoint)
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
        kind = UdpSession if route.faults is None else udp_faults.session_kind(route.faults)
        session = kind(self, key, client, endpoint, sock, ancillary, header)
        self.sessions[key] = session
        self.reactor.add(sock.fileno(), session.on_event, LEVEL)
        route.pool.acquire(endpoint)
        stats.udp_sess_total += 1
        stats.udp_sess_active += 1
        return session
