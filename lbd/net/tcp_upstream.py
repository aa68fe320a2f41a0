"""The endpoint half of a proxied TCP connection (``lbd.net.tcp_proxy`` has the client half).

Everything it reads goes to its connection's client transport; its own write buffer filling up
pauses the client's reading (cross-coupled flow control), and its EOF is passed on as a
half-close.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.net.splice import BULK_READ


class UpstreamOwner(Protocol):
    """What an Upstream needs of its connection (``lbd.net.tcp_proxy.Downstream``)."""

    loop: asyncio.AbstractEventLoop
    closed: bool

    transport: asyncio.Transport | None  # the client's
    sent: int  # bytes from the endpoint
    received: int  # bytes from the client (all forwarded once the upstream exists)
    client_eof: bool
    last_activity: float

    def attach(self, upstream: Upstream) -> None: ...

    def upstream_ended(self) -> None: ...

    def splice(self, upward: bool) -> None: ...

    def spliced(self, upward: bool) -> bool: ...

    def finish(self, reason: str, *, abort: bool = False) -> None: ...

    def retry_elsewhere(self, upstream: Upstream, why: str) -> None: ...


class Upstream(asyncio.Protocol):
    """The endpoint side of a proxied connection; forwards everything to its Downstream."""

    __slots__ = ("attached", "downstream", "endpoint", "timed_out", "transport", "tried")

    def __init__(
        self, downstream: UpstreamOwner, endpoint: UpstreamEndpoint, tried: list[UpstreamEndpoint]
    ) -> None:
        self.downstream = downstream
        self.endpoint = endpoint
        self.tried = tried  # the connection's tries so far: a retry after an early close skips them
        self.attached = False  # the connection's upstream (a later try may not be)
        self.timed_out = False  # its try's deadline passed before it connected
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.downstream.attach(self)

    def data_received(self, data: bytes) -> None:
        downstream = self.downstream
        downstream.sent += len(data)
        downstream.last_activity = downstream.loop.time()
        assert downstream.transport is not None
        downstream.transport.write(data)
        if len(data) >= BULK_READ:
            downstream.splice(False)

    def eof_received(self) -> bool:
        downstream = self.downstream
        if _nothing_passed(downstream):
            downstream.retry_elsewhere(self, "closed before any byte")
            return False
        downstream.upstream_ended()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        downstream = self.downstream
        if self.attached and not downstream.closed:
            if _nothing_passed(downstream):
                downstream.retry_elsewhere(self, "reset before any byte" if exc else "closed")
                return
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


def _nothing_passed(downstream: UpstreamOwner) -> bool:
    """No byte went either way and the client is still there to be served: nothing was
    delivered, so another endpoint may be tried. A client that already finished (its FIN was
    passed on) is not: an endpoint that closes then is answering that FIN."""
    return (
        not downstream.closed
        and not downstream.client_eof
        and downstream.sent == 0
        and downstream.received == 0
    )
