"""A handed-over UDP listener: its sessions still deliver replies, no datagram is read here."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lbd.net.udp_drain import UdpDrain
from lbd.net.udp_listener import UdpListener
from lbd.runtime.runtime import Runtime
from tests.support import (
    UdpClient,
    address_of,
    config,
    document,
    fresh_ip,
    running,
    service_yaml,
    udp_client,
)


class HeldBackend(asyncio.DatagramProtocol):
    """Answers only when the test says so (``answer``)."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((data, addr))

    def answer(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(b"re " + data, addr)


@contextlib.asynccontextmanager
async def held_backend() -> AsyncIterator[tuple[str, int, HeldBackend]]:
    transport, backend = await asyncio.get_running_loop().create_datagram_endpoint(
        HeldBackend, local_addr=(fresh_ip(), 0)
    )
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield host, port, backend
    finally:
        transport.close()


@dataclass
class HandedOver:
    """A client with one session whose first datagram the backend holds, and the drain its
    listener handed the session to."""

    runtime: Runtime
    client: UdpClient
    backend: HeldBackend
    upstream: tuple[str, int]  # the session's address, as the backend sees it
    drain: UdpDrain


@contextlib.asynccontextmanager
async def handed_over(defaults: str) -> AsyncIterator[HandedOver]:
    async with held_backend() as (bh, bp, backend):
        cfg = config(document(service_yaml("svc", [(bh, bp)], protocol="UDP"), defaults=defaults))
        async with running(cfg) as runtime, udp_client(address_of(runtime)) as client:
            client.send(b"a")
            data, upstream = await asyncio.wait_for(backend.received.get(), 5)
            listener = runtime.listener_for("default/svc").net
            assert isinstance(listener, UdpListener) and data == b"a"
            drain = listener.hand_over()
            assert drain is not None and listener.sessions == {} and len(drain.sessions) == 1
            yield HandedOver(runtime, client, backend, upstream, drain)


async def test_replies_on_their_way_still_arrive_and_new_datagrams_stay_queued() -> None:
    async with handed_over("{udpIdleTimeout: 300ms, drainTimeout: 30s}") as handed:
        client, drain = handed.client, handed.drain
        assert drain.sock is not None
        successor = drain.sock.dup()  # what the next lbd holds: the same socket
        try:
            handed.backend.answer(b"a", handed.upstream)
            assert await client.recv() == b"re a"  # through the old lbd's copy
            client.send(b"b")  # not read here any more: it waits for the successor
            successor.settimeout(5)
            data, sender = await asyncio.to_thread(successor.recvfrom, 100)
            assert data == b"b" and sender == client.local
            assert handed.backend.received.empty()
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(drain.wait(), 5)  # idle for udpIdleTimeout: it ends
            assert asyncio.get_running_loop().time() - started < 2
            assert drain.sock is None and drain.sessions == {}
            stats = handed.runtime.listener_for("default/svc").route.stats
            assert stats.udp_sess_active == 0 and stats.udp_sess_ended_total.idle_timeout == 1
            client.send(b"c")  # the successor's copy is still open, with its queue
            assert (await asyncio.to_thread(successor.recvfrom, 100))[0] == b"c"
        finally:
            successor.close()


async def test_a_session_that_stays_busy_ends_at_the_drain_timeout() -> None:
    async with handed_over("{udpIdleTimeout: 30s, drainTimeout: 500ms}") as handed:
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def keep_answering() -> None:  # a stream of replies: never idle
            while True:
                handed.backend.answer(b"x", handed.upstream)
                await asyncio.sleep(0.02)

        busy = asyncio.create_task(keep_answering())
        try:
            await asyncio.wait_for(handed.drain.wait(), 5)
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
        assert 0.45 <= loop.time() - started < 3
        assert handed.drain.sessions == {} and await handed.client.recv() == b"re x"


async def test_a_listener_without_a_socket_has_nothing_to_hand_over() -> None:
    # No endpoint: the listener closed its socket (kube-proxy's REJECT), nothing to drain.
    cfg = config(document(service_yaml("svc", [], protocol="UDP")))
    async with running(cfg) as runtime:
        listener = runtime.listener_for("default/svc").net
        assert isinstance(listener, UdpListener) and listener.sock is None
        assert listener.hand_over() is None
