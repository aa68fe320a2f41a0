"""maxConnections, the queue, per-endpoint limits, and the connection timeouts (±0.5 s)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from tests.support import (
    address_of,
    config,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    route_of,
    running,
    service_yaml,
    tcp_server,
    until,
)

MARGIN = 0.5

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(host: str, port: int) -> Conn:
    return await asyncio.wait_for(asyncio.open_connection(host, port), 5)


async def close(conn: Conn) -> None:
    conn[1].close()
    with contextlib.suppress(ConnectionError):
        await conn[1].wait_closed()


async def refused_at_once(host: str, port: int) -> bytes:
    """Connect to a port that refuses this connection with a reset: what it got (nothing). The
    reset may come before the client's own connect completes, which then fails with it."""
    try:
        conn = await connect(host, port)
    except ConnectionResetError:
        return b""
    try:
        return await ended(conn)
    finally:
        await close(conn)


async def ended(conn: Conn, timeout: float = 5.0) -> bytes:
    """Everything the connection still gets until lbd closes or resets it."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(conn[0].read(65536), timeout):
            data += chunk
    return data


async def test_max_connections_queue_then_admit_refuse_and_time_out() -> None:
    async with echo_backend("b") as (bh, bp, _):
        extra = "    maxConnections: 2\n    maxQueue: 1\n    queueTimeout: 1s\n"
        cfg = config(document(service_yaml("svc", [(bh, bp)], extra=extra)))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            stats = route_of(runtime).stats
            held = [await connect(host, port) for _ in range(2)]
            for conn in held:
                assert await asyncio.wait_for(conn[0].readline(), 5) == b"b\n"
            waiting = await connect(host, port)
            await until(lambda: stats.downstream_cx_queued_total == 1, 5)
            assert await refused_at_once(host, port) == b""  # queue full: reset at once
            assert stats.downstream_cx_refused_total.overflow == 1
            await close(held.pop())  # a slot frees: the queued one goes on
            assert await asyncio.wait_for(waiting[0].readline(), 5) == b"b\n"

            loop = asyncio.get_running_loop()
            timed_out = await connect(host, port)
            start = loop.time()
            assert await ended(timed_out) == b""
            assert abs(loop.time() - start - 1.0) <= MARGIN
            assert (
                stats.downstream_cx_refused_total.queue_timeout == 1
                and stats.downstream_cx_queued_total == 2
            )
            for conn in (*held, waiting, timed_out):
                await close(conn)


async def test_limits_a_reload_turns_on_count_the_connections_already_open() -> None:
    """maxConnections added by a reload: the connections open at that moment hold slots, so the
    next one is over the limit, and each that ends frees its slot."""
    cluster_ip = fresh_ip()
    async with echo_backend("b") as (bh, bp, _):
        plain = service_yaml("svc", [(bh, bp)], cluster_ip=cluster_ip)
        limited = service_yaml(
            "svc", [(bh, bp)], cluster_ip=cluster_ip, extra="    maxConnections: 2\n"
        )
        async with running(config(document(plain))) as runtime:
            host, port = address_of(runtime)
            held = [await connect(host, port) for _ in range(2)]
            for conn in held:
                assert await asyncio.wait_for(conn[0].readline(), 5) == b"b\n"
            await runtime.apply(config(document(limited)))
            route = route_of(runtime)
            assert route.admission is not None and route.admission.active == 2
            assert await refused_at_once(host, port) == b""  # 2 open, no queue: reset at once
            assert route.stats.downstream_cx_refused_total.overflow == 1
            await close(held.pop())
            await until(lambda: route.admission is not None and route.admission.active == 1, 5)
            fresh = await connect(host, port)
            assert await asyncio.wait_for(fresh[0].readline(), 5) == b"b\n"
            for conn in (*held, fresh):
                await close(conn)


async def test_over_the_endpoint_limit_goes_to_another_endpoint() -> None:
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        text = document(
            "  - name: svc\n"
            f"    clusterIP: {fresh_ip()}\n"
            "    ports: [{port: 0, targetPort: p}]\n"
            "    maxConnectionsPerEndpoint: 1\n"
            "    endpoints:\n"
            f"      - {{address: {h0}, ports: {{p: {p0}}}, weight: 10}}\n"
            f"      - {{address: {h1}, ports: {{p: {p1}}}, weight: 1}}\n"
        )
        async with running(config(text)) as runtime:
            host, port = address_of(runtime)
            first, second = await connect(host, port), await connect(host, port)
            names = {await asyncio.wait_for(c[0].readline(), 5) for c in (first, second)}
            assert names == {b"backend-0\n", b"backend-1\n"}
            assert await refused_at_once(host, port) == b""  # both full, no queue: refused
            assert route_of(runtime).stats.downstream_cx_refused_total.overflow == 1
            for conn in (first, second):
                await close(conn)


class Silent(asyncio.Protocol):
    """Accepts, never sends, and keeps its side open after the client's FIN."""

    transports: set[asyncio.BaseTransport]

    def __init__(self, transports: set[asyncio.BaseTransport]) -> None:
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.add(transport)

    def eof_received(self) -> bool:
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transports.clear()


@pytest.mark.parametrize(
    ("key", "counter"),
    [
        ("idleTimeout", "downstream_cx_idle_timeout_total"),
        ("halfClosedTimeout", "downstream_cx_half_closed_timeout_total"),
        ("maxConnectionDuration", "downstream_cx_max_duration_reached_total"),
    ],
)
async def test_each_timeout_closes_within_half_a_second(key: str, counter: str) -> None:
    transports: set[asyncio.BaseTransport] = set()
    async with tcp_server(lambda: Silent(transports)) as (bh, bp, _):
        cfg = config(document(service_yaml("svc", [(bh, bp)], extra=f"    {key}: 1s\n")))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            loop = asyncio.get_running_loop()
            conn = await connect(host, port)
            start = loop.time()
            if key == "halfClosedTimeout":
                conn[1].write_eof()  # one side finished; the backend never does
            busy = None
            if key == "maxConnectionDuration":
                # Bytes keep flowing, so only the duration bound can end it.
                async def chatter() -> None:
                    while True:
                        conn[1].write(b"x")
                        await asyncio.sleep(0.1)

                busy = asyncio.create_task(chatter())
            try:
                await ended(conn)
            finally:
                if busy is not None:
                    busy.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await busy
            took = loop.time() - start
            await close(conn)
            assert abs(took - 1.0) <= MARGIN, took
            assert getattr(route_of(runtime).stats, counter) == 1
        for transport in list(transports):
            transport.close()
