"""The endpoint half of a proxied TCP connection (``lbd.net.tcp_proxy`` has the client half).

Everything it reads goes to its connection's client socket; when the client cannot take it
all, the rest waits in the client half and this socket is not read again until it has gone
(cross-coupled flow control). Its EOF is passed on as a half-close, a failure as a reset; an
EOF or a reset before any byte (or the client's FIN) passed hands the client back to the tries
(``retry_elsewhere``): nothing was delivered, so another endpoint may take it.
"""

from __future__ import annotations

import _socket
import asyncio
from typing import Protocol

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.net.reactor import HANGUP, READABLE, WRITABLE, Reactor
from lbd.net.splice import BULK_READ
from lbd.net.tcp_socket import DONTWAIT, READ_SIZE, VIEW, SocketWriter, set_reset

ROUNDS = 4  # full reads per event: one fast stream cannot hold the loop


class UpstreamOwner(Protocol):
    """What an Upstream needs of its connection (``lbd.net.tcp_proxy.Downstream``)."""

    loop: asyncio.AbstractEventLoop
    reactor: Reactor
    closed: bool
    sent: int  # bytes from the endpoint
    received: int  # bytes from the client (all forwarded once the upstream exists)
    client_eof: bool  # the client's FIN was read (and passed on once the upstream exists)
    last_activity: float

    def send(self, data: bytes | memoryview) -> bool: ...  # to the client

    def upstream_ended(self) -> None: ...

    def upstream_drained(self) -> None: ...

    def splice(self, upward: bool) -> None: ...

    def finish(self, reason: str, *, abort: bool = False) -> None: ...

    def retry_elsewhere(self, upstream: Upstream, why: str) -> None: ...


class Upstream(SocketWriter):
    """The endpoint side of a proxied connection; forwards everything to its Downstream."""

    __slots__ = ("attached", "downstream", "ended", "endpoint", "reading", "timed_out", "tried")

    def __init__(
        self, downstream: UpstreamOwner, endpoint: UpstreamEndpoint, tried: list[UpstreamEndpoint]
    ) -> None:
        self.sock: _socket.socket | None = None  # set once connected
        self.out = None
        self.out_eof = False
        self.downstream = downstream
        self.endpoint = endpoint
        self.tried = tried  # the connection's tries so far: a retry after an early close skips them
        self.attached = False  # the connection's upstream (a later try may not be)
        self.timed_out = False  # its try's deadline passed before it connected
        self.reading = True  # False while the client holds bytes it could not send yet
        self.ended = False  # its EOF was read (and passed on)

    def on_event(self, events: int) -> None:
        if events & WRITABLE and self.out is not None:
            try:
                drained = self.flush()
            except OSError:
                self.downstream.finish("upstream_reset", abort=True)
                return
            if drained:
                self.downstream.upstream_drained()
        if events & READABLE:
            self.read(events & HANGUP != 0)

    def read(self, drain: bool = True) -> None:
        """Read and pass it to the client, until a short read or, with ``drain`` (the event
        said the peer hung up, or nobody knows what is queued), until EOF or EAGAIN: the socket
        is edge-triggered, and an EOF queued behind the data gives no edge of its own."""
        downstream = self.downstream
        sock = self.sock
        if sock is None:
            return  # closed meanwhile (this read was scheduled)
        for _ in range(ROUNDS):
            if not self.reading or self.ended or downstream.closed:
                return
            try:
                count = sock.recv_into(VIEW, READ_SIZE, DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.reset()
                return
            if not count:
                self.eof()
                return
            downstream.sent += count
            downstream.last_activity = downstream.loop.time()
            try:
                whole = downstream.send(VIEW[:count])
            except OSError:
                downstream.finish("client_reset", abort=True)
                return
            if not whole:
                self.reading = False  # until the client took it: resume
                return
            if count >= BULK_READ:
                downstream.splice(False)
            if count < READ_SIZE and not drain:
                return
        downstream.loop.call_soon(self.read)  # more may be queued: after the loop's other work

    def reset(self) -> None:
        """Reading the socket failed: the endpoint reset the connection."""
        downstream = self.downstream
        if nothing_passed(downstream):
            downstream.retry_elsewhere(self, "reset before any byte")
        else:
            downstream.finish("upstream_reset", abort=True)

    def eof(self) -> None:
        """The endpoint finished sending (its FIN was read)."""
        self.ended = True
        downstream = self.downstream
        if nothing_passed(downstream):
            downstream.retry_elsewhere(self, "closed before any byte")
        else:
            self.pass_eof()

    def pass_eof(self) -> None:
        """Pass the endpoint's FIN on to the client."""
        self.downstream.upstream_ended()

    def resume(self) -> None:
        """The client took what was kept: read again (the edge may have passed meanwhile)."""
        self.reading = True
        self.read()

    def connected(self, sock: _socket.socket) -> None:
        """Its connect try succeeded: ``sock`` is the connection's socket to the endpoint."""
        self.sock = sock
        self.downstream.reactor.retarget(sock.fileno(), self.on_event)

    def close(self, abort: bool) -> None:
        """Close the socket (``abort``: with a reset), once: the connection ended, or left
        this endpoint for another. Nothing is read from it any more."""
        sock = self.sock
        if sock is not None:
            self.sock = None
            if abort:
                set_reset(sock)
            self.downstream.reactor.close(sock)


def nothing_passed(downstream: UpstreamOwner) -> bool:
    """No byte went either way and the client is still there to be served: nothing was
    delivered, so another endpoint may be tried. A client that already finished (its FIN was
    passed on) is not: an endpoint that closes then is answering that FIN."""
    return (
        not downstream.closed
        and not downstream.client_eof
        and downstream.sent == 0
        and downstream.received == 0
    )
