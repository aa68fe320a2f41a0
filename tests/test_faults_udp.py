"""UDP faults with real sockets (lbd.net.udp_faults): drop, delay, duplicate and reorder, each
per datagram with its probability, in the direction it is set for."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics
from collections.abc import AsyncIterator

from lbd.config import Config
from tests.support import (
    address_of,
    config,
    document,
    fresh_ip,
    route_of,
    running,
    service_yaml,
    udp_client,
    udp_echo_backend,
    until,
)


def faulty(endpoints: list[tuple[str, int]], faults: str) -> Config:
    extra = f"    faults: {faults}\n"
    return config(document(service_yaml("svc", endpoints, protocol="UDP", extra=extra)))


class Recorder(asyncio.DatagramProtocol):
    """A UDP backend that keeps every datagram, in the order they arrived, and echoes it."""

    def __init__(self) -> None:
        self.arrived: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.arrived.append(data)
        assert self.transport is not None
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def recorder() -> AsyncIterator[tuple[str, int, Recorder]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Recorder, local_addr=(fresh_ip(), 0))
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        yield host, port, protocol
    finally:
        transport.close()


async def test_drop_loses_datagrams_with_its_probability() -> None:
    """1,000 datagrams, drop at 0.3 towards the endpoint: the losses are within four standard
    deviations of 300, and every other datagram arrives (sent in paced bursts, so that the
    only loss is the fault's)."""
    async with udp_echo_backend() as (host, port, backend):
        cfg = faulty([(host, port)], "[{type: drop, direction: upstream, probability: 0.3}]")
        async with running(cfg, random.Random(8)) as runtime:
            [fault] = route_of(runtime).fault_book.faults
            async with udp_client(address_of(runtime)) as client:
                for burst in range(20):
                    for i in range(50):
                        client.send(b"%d" % (burst * 50 + i))
                    sent = (burst + 1) * 50

                    def arrived_or_dropped(sent: int = sent) -> bool:
                        return backend.datagrams + fault.stats.fault_applied_total == sent

                    await until(arrived_or_dropped)
    dropped = fault.stats.fault_applied_total
    assert abs(dropped - 300) <= 4 * math.sqrt(1000 * 0.3 * 0.7), dropped
    assert backend.datagrams == 1000 - dropped


async def test_duplicate_sends_replies_twice() -> None:
    async with udp_echo_backend() as (host, port, backend):
        cfg = faulty([(host, port)], "[{type: duplicate, direction: downstream}]")
        async with running(cfg) as runtime:
            async with udp_client(address_of(runtime)) as client:
                for i in range(5):
                    request = b"q%d" % i
                    assert await client.ask(request) == request
                    assert await client.recv() == request  # the copy
    assert backend.datagrams == 5  # only the replies were doubled


async def test_delay_holds_each_datagram_for_its_time() -> None:
    loop = asyncio.get_running_loop()
    async with udp_echo_backend() as (host, port, _):
        cfg = faulty([(host, port)], "[{type: delay, delay: 25ms}]")  # both ways: 50 ms
        async with running(cfg) as runtime:
            async with udp_client(address_of(runtime)) as client:
                times = []
                for i in range(20):
                    started = loop.time()
                    assert await client.ask(b"%d" % i) == b"%d" % i
                    times.append(loop.time() - started)
    assert min(times) >= 0.049 and statistics.mean(times) <= 0.06


async def test_reorder_changes_the_order_and_loses_nothing() -> None:
    async with recorder() as (host, port, backend):
        cfg = faulty([(host, port)], "[{type: reorder, direction: upstream, probability: 0.3}]")
        async with running(cfg, random.Random(5)) as runtime:
            async with udp_client(address_of(runtime)) as client:
                sent = [b"%03d" % i for i in range(200)]
                for datagram in sent:
                    client.send(datagram)
                await until(lambda: len(backend.arrived) == 200)
    assert sorted(backend.arrived) == sent  # every one arrived once
    assert backend.arrived != sent  # and some overtook others
    moved = sum(1 for a, b in zip(backend.arrived, sent, strict=True) if a != b)
    assert moved >= 20


async def test_udp_faults_act_per_direction() -> None:
    async with recorder() as (host, port, backend):
        cfg = faulty([(host, port)], "[{type: drop, direction: downstream}]")
        async with running(cfg) as runtime:
            async with udp_client(address_of(runtime)) as client:
                for i in range(10):
                    client.send(b"%d" % i)
                await until(lambda: len(backend.arrived) == 10)  # every request arrived
                stats = route_of(runtime).stats
                await until(lambda: stats.udp_upstream_datagrams_received_total == 10)
                assert client.protocol.received.empty()  # and no reply came back
