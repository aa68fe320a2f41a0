"""TCP faults with real sockets (lbd.net.tcp_faults, lbd.net.fault_pipe): each one's
measured effect against its setting, its scope, and that it never leaks into another service."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import statistics

from lbd.config import Config
from lbd.net.fault_pipe import HIGH_WATER
from lbd.net.tcp_faults import FaultyUpstream
from lbd.runtime.runtime import Runtime
from tests.support import (
    address_of,
    bulk_exchange,
    config,
    document,
    echo_backend,
    echo_backends,
    read_name,
    route_of,
    running,
    service_yaml,
    stream_backend,
    until,
)


def faulty(endpoints: list[tuple[str, int]], faults: str, extra: str = "") -> Config:
    return config(document(service_yaml("svc", endpoints, extra=f"    faults: {faults}\n{extra}")))


async def round_trips(runtime: Runtime, count: int, service: str = "default/svc") -> list[float]:
    """Seconds each of ``count`` 4-byte echoes took over one connection."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*address_of(runtime, service))
    times = []
    try:
        for _ in range(count):
            started = loop.time()
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            times.append(loop.time() - started)
    finally:
        writer.close()
    return times


async def test_latency_delays_every_chunk_by_its_setting() -> None:
    async with echo_backend() as (host, port, _):
        cfg = faulty([(host, port)], "[{type: latency, direction: downstream, latency: 50ms}]")
        async with running(cfg) as runtime:
            times = await round_trips(runtime, 100)
            [fault] = route_of(runtime).fault_book.faults
    assert 0.040 <= statistics.mean(times) <= 0.060, statistics.mean(times)  # 50 ms ± 20 %
    assert min(times) >= 0.049  # never less than the latency (the clock counts milliseconds)
    assert fault.stats.fault_applied_total == 1  # per connection
    assert fault.stats.fault_bytes_delayed_total == 400


async def test_jitter_spreads_the_delay_around_the_latency() -> None:
    async with echo_backend() as (host, port, _):
        cfg = faulty(
            [(host, port)], "[{type: latency, direction: upstream, latency: 20ms, jitter: 10ms}]"
        )
        async with running(cfg, random.Random(3)) as runtime:
            times = await round_trips(runtime, 40)
    assert min(times) >= 0.010 and max(times) <= 0.045
    assert statistics.stdev(times) > 0.002  # spread, not a constant


async def test_bandwidth_holds_its_rate_and_keeps_flow_control() -> None:
    """1 MiB/s towards the client, measured over 5 s, while the backend writes as fast as it
    can: lbd itself never holds more than its fault buffer (the backend is paused instead)."""
    rate = 1024 * 1024
    written = 0

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        block = bytes(65536)
        with contextlib.suppress(ConnectionError):
            while written < 64 * rate:
                writer.write(block)
                await writer.drain()
                written += len(block)
        writer.close()

    async with stream_backend(firehose) as (host, port):
        cfg = faulty([(host, port)], "[{type: bandwidth, rate: 1MiB}]")
        async with running(cfg) as runtime:
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            received = len(await asyncio.wait_for(reader.read(65536), 5))
            started = loop.time()
            held = 0
            while loop.time() - started < 5.0:
                received += len(await asyncio.wait_for(reader.read(65536), 5))
                [connection] = runtime.connections
                assert isinstance(connection.upstream, FaultyUpstream)
                held = max(held, connection.upstream.down.queued)
            measured = received / (loop.time() - started)
            writer.close()
    assert abs(measured - rate) <= 0.1 * rate, measured
    # Bounded by the fault's buffer plus one read (256 KiB), not by the size of the transfer.
    assert held <= HIGH_WATER + 256 * 1024
    assert written < 32 * rate  # the backend was paused long before it wrote everything


async def test_limit_data_delivers_exactly_the_limit_then_closes() -> None:
    async def talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(range(250)) * 20)  # 5,000 bytes
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    async with stream_backend(talker) as (host, port):
        cfg = faulty([(host, port)], "[{type: limit_data, bytes: 1000}]")
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            got = await asyncio.wait_for(reader.read(), 5)  # to EOF
            writer.close()
            [fault] = route_of(runtime).fault_book.faults
            await until(lambda: not runtime.connections)
    assert got == (bytes(range(250)) * 4)  # exactly the first 1,000 bytes
    assert fault.stats.fault_cx_cut_total == 1


async def test_limit_data_upstream_cuts_what_the_client_sends() -> None:
    async with echo_backend() as (host, port, backend):
        cfg = faulty([(host, port)], "[{type: limit_data, direction: upstream, bytes: 1500}]")
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            writer.write(bytes(4000))
            echoed = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await until(lambda: not runtime.connections)
    assert backend.received == 1500  # the connection ended there: the echo may not come back
    assert len(echoed) <= 1500


async def test_slicer_cuts_data_into_delayed_pieces() -> None:
    loop = asyncio.get_running_loop()

    async def talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(bytes(1000))
        await writer.drain()
        writer.close()

    async with stream_backend(talker) as (host, port):
        cfg = faulty(
            [(host, port)], "[{type: slicer, averageSize: 100, sizeVariation: 20, delay: 20ms}]"
        )
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            started = loop.time()
            reads = []
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                reads.append(len(chunk))
            took = loop.time() - started
            writer.close()
    assert sum(reads) == 1000
    assert len(reads) >= 6 and max(reads) <= 240  # pieces, not one read
    assert took >= 0.1


async def test_timeout_drops_data_and_closes_after_its_time() -> None:
    loop = asyncio.get_running_loop()
    async with echo_backend() as (host, port, backend):
        cfg = faulty([(host, port)], "[{type: timeout, direction: upstream, timeout: 200ms}]")
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            started = loop.time()
            writer.write(b"hello")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing echoed
            took = loop.time() - started
            writer.close()
            [fault] = route_of(runtime).fault_book.faults
    assert 0.19 <= took <= 1.0
    assert backend.received == 0
    assert fault.stats.fault_bytes_discarded_total == 5 and fault.stats.fault_cx_cut_total == 1


async def test_reset_peer_resets_after_its_time() -> None:
    loop = asyncio.get_running_loop()
    async with echo_backend() as (host, port, _):
        cfg = faulty([(host, port)], "[{type: reset_peer, timeout: 100ms}]")
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            started = loop.time()
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"  # works till then
            try:
                await asyncio.wait_for(reader.read(), 5)
                reset = False
            except ConnectionResetError:
                reset = True
            took = loop.time() - started
            writer.close()
    assert reset and 0.09 <= took <= 1.0


async def test_slow_close_holds_the_fin_back() -> None:
    loop = asyncio.get_running_loop()

    async def talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.close()

    async with stream_backend(talker) as (host, port):
        cfg = faulty([(host, port)], "[{type: slow_close, delay: 300ms}]")
        async with running(cfg) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            started = loop.time()
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"bye"
            data_at = loop.time() - started
            assert await asyncio.wait_for(reader.read(), 5) == b""
            eof_at = loop.time() - started
            writer.close()
    assert data_at < 0.2 and eof_at >= 0.299


async def test_refuse_resets_new_connections_with_its_probability() -> None:
    """1,000 connections, refuse at 0.3: the resets are within four standard deviations of
    300 (the run is deterministic: the randomness is seeded)."""
    async with echo_backend("up") as (host, port, _):
        cfg = faulty([(host, port)], "[{type: refuse, probability: 0.3}]")
        async with running(cfg, random.Random(15)) as runtime:
            target = address_of(runtime)
            gate = asyncio.Semaphore(20)

            async def attempt() -> bool:
                async with gate:
                    try:
                        return await read_name(*target) == "up"
                    except (ConnectionError, asyncio.IncompleteReadError):
                        return False

            served = sum(await asyncio.gather(*(attempt() for _ in range(1000))))
            stats = route_of(runtime).stats
            [fault] = route_of(runtime).fault_book.faults
    refused = 1000 - served
    assert abs(refused - 300) <= 4 * math.sqrt(1000 * 0.3 * 0.7), refused
    assert stats.downstream_cx_refused_total.fault == refused == fault.stats.fault_cx_cut_total


async def test_refuse_scoped_to_an_endpoint_fails_its_connects() -> None:
    """The other endpoint takes every connection; the refusing one is counted as failing its
    connects, so outlier detection ejects it, and it never sees a connection."""
    async with echo_backends(2) as backends:
        (a_host, a_port, a_stats), (b_host, b_port, _) = backends
        cfg = faulty(
            [(a_host, a_port), (b_host, b_port)],
            f"[{{type: refuse, endpoints: ['{a_host}:{a_port}']}}]",
            "    outlierDetection: {consecutiveFailures: 3, baseEjectionTime: 60s, "
            "maxEjectionPercent: 50}\n",
        )
        async with running(cfg) as runtime:
            names = [await read_name(*address_of(runtime)) for _ in range(10)]
            route = route_of(runtime)
            refusing = route.pool.member((a_host, a_port))
    assert names == ["backend-1"] * 10
    assert refusing is not None and refusing.ejected
    assert refusing.stats.upstream_cx_connect_fail_total >= 3
    assert a_stats.connections == 0


async def test_a_fault_scoped_to_an_endpoint_leaves_the_others_alone() -> None:
    async with echo_backends(2) as backends:
        (a_host, a_port, _), (b_host, b_port, _) = backends
        cfg = faulty(
            [(a_host, a_port), (b_host, b_port)],
            f"[{{type: latency, latency: 100ms, endpoints: ['{b_host}']}}]",
        )
        async with running(cfg) as runtime:
            loop = asyncio.get_running_loop()
            took = {}
            for _ in range(2):  # round-robin: one connection to each
                started = loop.time()
                name = await read_name(*address_of(runtime))
                took[name] = loop.time() - started
    assert took["backend-0"] < 0.05 and took["backend-1"] >= 0.099


async def test_faults_never_leak_into_another_service() -> None:
    async with echo_backend() as (host, port, _):
        faulty_service = service_yaml(
            "slow", [(host, port)], extra="    faults: [{type: latency, latency: 200ms}]\n"
        )
        cfg = config(document(faulty_service, service_yaml("fast", [(host, port)])))
        async with running(cfg) as runtime:
            fast = await round_trips(runtime, 5, "default/fast")
            slow = await round_trips(runtime, 1, "default/slow")
            routes = {route.service: route for route in runtime.routes.values()}
    assert max(fast) < 0.05 and slow[0] >= 0.195  # the loop's clock counts milliseconds
    assert routes["fast"].faults is None and routes["slow"].faults is not None


async def test_faulty_connections_stay_byte_exact_both_ways() -> None:
    """Latency both ways and a slicer upward, over a 4 MiB transfer each way with half-closes:
    every byte arrives, in order, and the connection ends as it would without faults."""
    stats = await bulk_exchange(
        4 * 1024 * 1024,
        4 * 1024 * 1024,
        extra="    faults: [{type: latency, direction: both, latency: 2ms, jitter: 1ms}, "
        "{type: slicer, direction: upstream, averageSize: 16KiB, sizeVariation: 4KiB}]\n",
    )
    assert stats.splice_switches_total == 0  # faulty bytes stay in Python


async def test_faults_touch_health_probes_only_when_asked() -> None:
    """Three ports probe the same endpoint the same way: the one whose refuse fault asks for
    it sees the endpoint fail its probes; the one whose fault does not, and the one without
    faults, keep it healthy (their checker is shared; the asking port's is its own)."""
    check = "    healthCheck: {interval: 50ms, timeout: 1s, unhealthyThreshold: 2, healthyThreshold: 1}\n"
    async with echo_backend() as (host, port, _):
        services = [
            service_yaml(
                "asking",
                [(host, port)],
                extra=check + "    faults: [{type: refuse, healthChecks: true}]\n",
            ),
            service_yaml("quiet", [(host, port)], extra=check + "    faults: [{type: refuse}]\n"),
            service_yaml("plain", [(host, port)], extra=check),
        ]
        async with running(config(document(*services))) as runtime:
            routes = {route.service: route for route in runtime.routes.values()}

            def healthy(name: str) -> bool:
                [endpoint] = routes[name].pool.members
                return endpoint.healthy

            await until(lambda: not healthy("asking"), what="the asking port's probes to fail")
            probes = runtime.health.stats
            await until(lambda: probes.health_checks_total >= 12)  # both checkers, six each
            assert healthy("quiet") and healthy("plain")
            assert len(runtime.health) == 2  # the shared checker, and the asking port's own
