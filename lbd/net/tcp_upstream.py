"""The endpoint half of a proxied TCP connection (``lbd.net.tcp_proxy`` has the client half).

Everything it reads goes to its connection's client socket; when the client cannot take it
all, the rest waits in the client half and this socket is not read again until it has gone
(cross-coupled flow control). Its EOF is passed on as a half-close, a failure as a reset.
"""

from __future__ import annotations

import _socket
import asyncio
from typing import Protocol

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.net.reactor import HANGUP, READABLE, WRITABLE
from lbd.net.splice import BULK_READ
from lbd.net.tcp_socket import DONTWAIT, READ_SIZE, VIEW, SocketWriter

ROUNDS = 4  # full reads per event: one fast stream cannot hold the loop


class UpstreamOwner(Protocol):
    """What an Upstream needs of its connection (``lbd.net.tcp_proxy.Downstream``)."""

    loop: asyncio.AbstractEventLoop
    closed: bool
    sent: int
    last_activity: float

    def send(self, data: bytes | memoryview) -> bool: ...  # to the client

    def upstream_ended(self) -> None: ...

    def upstream_drained(self) -> None: ...

    def splice(self, upward: bool) -> None: ...

    def finish(self, reason: str, *, abort: bool = False) -> None: ...


class Upstream(SocketWriter):
    """The endpoint side of a proxied connection; forwards everything to its Downstream."""

    __slots__ = ("attached", "downstream", "ended", "endpoint", "reading", "timed_out")

    def __init__(self, downstream: UpstreamOwner, endpoint: UpstreamEndpoint) -> None:
        self.sock: _socket.socket | None = None  # set once connected
        self.out = None
        self.out_eof = False
        self.downstream = downstream
        self.endpoint = endpoint
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
        assert sock is not None
        for _ in range(ROUNDS):
            if not self.reading or self.ended or downstream.closed:
                return
            try:
                count = sock.recv_into(VIEW, READ_SIZE, DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                downstream.finish("upstream_reset", abort=True)
                return
            if not count:
                self.ended = True
                downstream.upstream_ended()
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

    def resume(self) -> None:
        """The client took what was kept: read again (the edge may have passed meanwhile)."""
        self.reading = True
        self.read()
