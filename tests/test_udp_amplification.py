"""UDP amplification and shedding: ``udpResponses`` caps the replies each client datagram
allows (nginx's ``proxy_responses``), ``udpSessionRate`` caps new sessions per client address.
Real sockets on 127.x; the backend answers every datagram with ten large ones, as an abused
DNS or NTP server would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from lbd.net.udp_rate import MAX_SOURCES, SourceRate
from tests.support import (
    address_of,
    config,
    fresh_ip,
    running,
    udp_client,
    udp_echo_backend,
    until,
)
from tests.test_udp_proxy import name_of, udp_route, udp_service

REPLIES = 10  # datagrams the amplifier answers each request with
REPLY_SIZE = 1400


class Amplifier(asyncio.DatagramProtocol):
    """Answers each datagram with ``REPLIES`` datagrams of ``REPLY_SIZE`` bytes, all sent in one
    callback: they are queued at lbd's session socket before lbd reads the first."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        for index in range(REPLIES):
            head = b"%d %s " % (index, data)
            self.transport.sendto(head + b"x" * (REPLY_SIZE - len(head)), addr)


@contextlib.asynccontextmanager
async def amplifier() -> AsyncIterator[tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Amplifier, local_addr=(fresh_ip(), 0))
    try:
        yield transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


async def replies_to(text: str, requests: int) -> tuple[list[bytes], object]:
    """Send ``requests`` one-byte datagrams through lbd, one at a time, and collect every
    reply that came back (after the first of each, whatever else was already on its way)."""
    async with amplifier() as backend, running(config(udp_service([backend], extra=text))) as rt:
        route = udp_route(rt)
        async with udp_client(address_of(rt)) as client:
            got: list[bytes] = []
            for number in range(requests):
                got.append(await client.ask(b"%d" % number))
            # Without a cap the other nine follow; with one, lbd ended each session in the
            # callback that forwarded its reply, so nothing else can come: a short look.
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append(await client.recv(timeout=0.2 if not text else 0.05))
        return got, route.stats


async def test_without_a_cap_one_byte_comes_back_as_ten_large_datagrams() -> None:
    """What ``udpResponses`` is for: the amplification lbd passes on when it is not set."""
    got, _ = await replies_to("", 1)
    assert len(got) == REPLIES and sum(map(len, got)) == REPLIES * REPLY_SIZE


async def test_udp_responses_caps_the_replies_each_datagram_allows_and_counts_the_rest() -> None:
    got, stats = await replies_to("    udpResponses: 1\n", 3)
    # One reply per one-byte request: 1,400 bytes out per byte in, not 14,000.
    assert [reply.split(b" ")[:2] for reply in got] == [[b"0", b"0"], [b"0", b"1"], [b"0", b"2"]]
    assert stats.udp_replies_capped_total == 3 * (REPLIES - 1)  # type: ignore[attr-defined]
    assert stats.udp_sess_ended_total.replied == 3  # type: ignore[attr-defined]
    assert stats.udp_downstream_datagrams_sent_total == 3  # type: ignore[attr-defined]


async def test_udp_responses_of_three_lets_three_through() -> None:
    got, stats = await replies_to("    udpResponses: 3\n", 1)
    assert [reply.split(b" ")[0] for reply in got] == [b"0", b"1", b"2"]
    assert stats.udp_replies_capped_total == REPLIES - 3  # type: ignore[attr-defined]


async def test_a_session_that_sends_more_gets_more_replies() -> None:
    """Each client datagram of an open session adds its allowance: a client that sends two
    datagrams before the answers come back gets two answers."""
    async with udp_echo_backend("b") as (bh, bp, _):
        text = udp_service([(bh, bp)], extra="    udpResponses: 1\n")
        async with running(config(text)) as runtime:
            route = udp_route(runtime)
            async with udp_client(address_of(runtime)) as client:
                client.send(b"one")
                client.send(b"two")
                assert {await client.recv(), await client.recv()} == {b"b one", b"b two"}
                await until(lambda: route.stats.udp_sess_ended_total.replied == 1)
                assert route.stats.udp_replies_capped_total == 0
                assert await name_of(client) == "b"  # a new session, as the first ended


async def test_udp_session_rate_limits_new_sessions_per_client_address() -> None:
    """Twenty new sessions at once from one address with ``udpSessionRate: 5``: about five
    start (plus what the rate refills meanwhile), the rest are dropped and counted, and
    another address is not affected."""
    async with udp_echo_backend("b") as (bh, bp, _):
        text = udp_service([(bh, bp)], extra="    udpSessionRate: 5\n")
        async with running(config(text)) as runtime:
            route = udp_route(runtime)
            target = address_of(runtime)
            loop = asyncio.get_running_loop()
            source = fresh_ip()
            started = loop.time()
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(udp_client(target, source)) for _ in range(20)
                ]
                for client in clients:
                    client.send(b"hi")
                await until(lambda: route.stats.udp_downstream_datagrams_received_total == 20)
                elapsed = loop.time() - started
                dropped = route.stats.udp_sess_dropped_total.rate
                allowed = 5 + int(elapsed * 5) + 1
                assert 20 - allowed <= dropped <= 15
                assert route.stats.udp_sess_total == 20 - dropped
                async with udp_client(target) as other:
                    assert await name_of(other) == "b"


def test_source_rate_refills_at_the_rate_and_forgets_the_oldest_address() -> None:
    rates = SourceRate()
    assert [rates.allow("a", 2, 0.0) for _ in range(3)] == [True, True, False]
    assert rates.allow("a", 2, 0.4) is False  # 0.8 of a token back
    assert rates.allow("a", 2, 0.5) is True  # one whole token
    assert rates.allow("a", 2, 100.0) and rates.allow("a", 2, 100.0)  # capped at the burst
    assert not rates.allow("a", 2, 100.0)
    for index in range(MAX_SOURCES):
        rates.allow(f"s{index}", 2, 100.0)
    assert len(rates.buckets) == MAX_SOURCES and "a" not in rates.buckets
