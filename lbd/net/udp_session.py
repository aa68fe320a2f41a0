"""One UDP session: a client of one listener, bound to one endpoint through one connected socket.

Client datagrams go out on the session's socket (``forward``); each reply leaves through the
listener's socket from exactly the address and port the client sent to (``on_readable``). The
session ends on idle timeout, when its endpoint leaves the eligible set, on an ICMP error from
the endpoint (so the client's next datagram picks again), or after its last expected reply.

A session is made for every new client address, and a resolver sends each query from a new
port: so a session costs what a query costs. Its socket is non-blocking from ``socket()`` with
the kernel's default buffers (no fcntl, no setsockopt), joins the worker's ``Reactor`` (one
epoll_ctl; closing it is all it takes to leave), and its idle deadline is an entry in the
listener's idle wheel, not a timer.

With ``udpResponses: N`` (nginx's ``proxy_responses``) each client datagram allows N replies:
a reply beyond what the client's datagrams allowed is dropped and counted, so an endpoint that
answers one byte with ten large datagrams cannot turn lbd into an amplifier for a spoofed
source; and once every allowed reply has come, the session ends there and then (what is still
queued on its socket is read and dropped), so nothing of a DNS query is left to expire.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
from typing import Protocol

import structlog

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.route import Route
from lbd.net.idle import Idler, IdleWheel
from lbd.net.reactor import Reactor

log = structlog.get_logger("lbd.udp")

MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
BATCH = 64  # datagrams read per wakeup at most: one busy socket cannot hold the loop for long


def next_batch(batch: int, received: int, dry: bool) -> int:
    """How many datagrams to read at a socket's next wakeup. Sockets are level-triggered, so
    whatever is left is reported again: reading until EAGAIN (a system call and an exception)
    only pays for bursts. A wakeup that found the socket dry reads what it read this time (at
    least one) next time; one that read its whole batch reads twice as many."""
    if dry:
        return received or 1
    return min(BATCH, batch * 2) if received == batch else batch


_DGRAM = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
# Errors a connected UDP socket reports for an ICMP error from its peer.
ICMP_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE, errno.EPROTO}
)

Client = tuple[str, int] | tuple[str, int, int, int]
Ancillary = list[tuple[int, int, bytes]]


class SessionOwner(Protocol):
    """What a session needs of its listener (``lbd.net.udp_listener.UdpListener``)."""

    loop: asyncio.AbstractEventLoop
    reactor: Reactor  # the loop's epoll set: the session's socket joins it
    idle: IdleWheel  # the idle deadlines of the listener's sessions
    sock: socket.socket | None  # the listener socket replies leave through
    view: memoryview  # the listener's receive buffer, shared by its sessions
    sessions: dict[object, UdpSession]

    @property
    def route(self) -> Route: ...


def connect_upstream(endpoint: UpstreamEndpoint) -> _socket.socket:
    # The default buffers (net.core.rmem_default, ~208 KiB) hold a few maximum-size
    # datagrams, as a session needs, and cost no system call.
    sock = _socket.socket(endpoint.family, _DGRAM, socket.IPPROTO_UDP)
    try:
        # Connected: the kernel filters replies to this endpoint and reports its ICMP errors.
        sock.connect((endpoint.address, endpoint.port))
    except OSError:
        sock.close()
        raise
    return sock


class UdpSession:
    """One client of one listener, bound to one endpoint through one connected socket."""

    __slots__ = (
        "ancillary",
        "batch",
        "client",
        "closed",
        "endpoint",
        "header",
        "idle_bucket",
        "key",
        "last_activity",
        "listener",
        "replies",
        "sock",
    )

    def __init__(
        self,
        listener: SessionOwner,
        key: object,
        client: Client,
        endpoint: UpstreamEndpoint,
        sock: _socket.socket,
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
        # Replies the client's datagrams still allow (udpResponses); None: no cap. A reload
        # that changes udpResponses applies to the sessions that start after it.
        self.replies: int | None = None if listener.route.tunables.udp_responses is None else 0
        self.batch = 1  # replies read at the next wakeup (next_batch)
        self.closed = False
        self.idle_bucket: set[Idler] | None = None  # where the idle wheel filed it
        self.last_activity = now = listener.loop.time()
        listener.idle.file(self, now + listener.route.tunables.udp_idle_timeout)
        # The listener adds the socket to its reactor (one of these may hand over to another).

    def forward(self, data: memoryview) -> bool:
        """Send one client datagram to the endpoint. False: the session has ended (an earlier
        ICMP error) and the datagram was not sent; the caller may open a new session."""
        listener = self.listener
        self.last_activity = listener.loop.time()
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
        if self.replies is not None:
            self.replies += listener.route.tunables.udp_responses or 0
        return True

    def on_event(self, events: int) -> None:
        self.on_readable()

    def on_readable(self) -> None:
        """Endpoint → client: each reply leaves through the listener socket."""
        listener = self.listener
        out = listener.sock
        if self.closed or out is None:
            return
        view = listener.view
        sock = self.sock
        client = self.client
        ancillary = self.ancillary
        received = nbytes = sent = 0
        dry = False
        for _ in range(self.batch):
            try:
                n = sock.recv_into(view)
            except BlockingIOError:
                dry = True
                break
            except OSError as error:
                self._upstream_error(error, reading=True)
                break
            received += 1
            nbytes += n
            if self.replies is not None and not self.take_reply():
                continue
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
        self.batch = next_batch(self.batch, received, dry)
        if received:
            self.last_activity = listener.loop.time()
            stats = listener.route.stats
            stats.udp_upstream_datagrams_received_total += received
            stats.udp_upstream_bytes_received_total += nbytes
            stats.udp_downstream_datagrams_sent_total += sent
        if self.replies == 0:
            self.all_replied()

    def take_reply(self) -> bool:
        """udpResponses: whether one more reply may go to the client (else it is counted)."""
        if self.replies:
            self.replies -= 1
            return True
        self.listener.route.stats.udp_replies_capped_total += 1
        return False

    def all_replied(self) -> None:
        """Every reply the client's datagrams allowed has come: end the session (nothing of it
        is left: no idle deadline, no socket). Replies already queued are read and counted as
        capped; later ones meet a closed port (the kernel answers ICMP port unreachable)."""
        view = self.listener.view
        stats = self.listener.route.stats
        for _ in range(BATCH):
            try:
                self.sock.recv_into(view)
            except OSError:  # BlockingIOError: nothing more queued
                break
            stats.udp_replies_capped_total += 1
        stats.udp_sess_ended_total.replied += 1
        self.finish("replied")

    def hand_over(self, kind: type[UdpSession]) -> UdpSession:
        """Carry on as a session of ``kind`` (its port's faults went on or off): the same socket,
        endpoint and idle deadline; this object retires without closing anything."""
        listener = self.listener
        listener.idle.remove(self)
        successor = kind(
            listener, self.key, self.client, self.endpoint, self.sock, self.ancillary, self.header
        )
        successor.last_activity = last = self.last_activity
        successor.replies = self.replies
        listener.idle.file(successor, last + listener.route.tunables.udp_idle_timeout)
        self.closed = True
        listener.sessions[self.key] = successor
        listener.reactor.retarget(self.sock.fileno(), successor.on_event)
        return successor

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

    def check_idle(self) -> None:
        """Called by the idle wheel when the deadline it was filed under passed."""
        listener = self.listener
        deadline = self.last_activity + listener.route.tunables.udp_idle_timeout
        if listener.loop.time() >= deadline:
            listener.route.stats.udp_sess_ended_total.idle_timeout += 1
            self.finish("idle_timeout")
        else:
            listener.idle.file(self, deadline)

    def finish(self, reason: str) -> None:
        """End the session once: stop reading, close the socket, release the endpoint."""
        if self.closed:
            return
        self.closed = True
        listener = self.listener
        listener.idle.remove(self)
        listener.reactor.close(self.sock)
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
