"""The TCP data path with real sockets on 127.x, on uvloop and on asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.route import Route
from lbd.runtime.runtime import Runtime
from tests.support import (
    address_of,
    bulk_exchange,
    config,
    dead_port,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    listening_socket,
    read_name,
    route_of,
    running,
    send_hashed,
    service_yaml,
    stream_backend,
    until,
    upstream_totals,
)

MiB = 1024 * 1024


async def test_round_robin_through_lbd_spreads_evenly() -> None:
    async with echo_backends(3) as backends:
        cfg = config(document(service_yaml("svc", [(h, p) for h, p, _ in backends])))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            names = Counter([await read_name(host, port) for _ in range(30)])
    assert names == {"backend-0": 10, "backend-1": 10, "backend-2": 10}


async def test_weights_apply_through_lbd() -> None:
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        text = document(
            "  - name: svc\n"
            f"    clusterIP: {fresh_ip()}\n"
            "    ports: [{port: 0, targetPort: p}]\n"
            "    endpoints:\n"
            f"      - {{address: {h0}, ports: {{p: {p0}}}, weight: 3}}\n"
            f"      - {{address: {h1}, ports: {{p: {p1}}}, weight: 1}}\n"
        )
        async with running(config(text)) as runtime:
            host, port = address_of(runtime)
            names = Counter([await read_name(host, port) for _ in range(40)])
    assert names == {"backend-0": 30, "backend-1": 10}


async def test_every_listener_kind_forwards() -> None:
    node_ip, lb_ip, ext_ip = fresh_ip(), fresh_ip(), fresh_ip()
    node_port = 30000 + os.getpid() % 2700
    async with echo_backend("only") as (bh, bp, _):
        text = document(
            "  - name: svc\n"
            "    type: LoadBalancer\n"
            f"    clusterIP: {fresh_ip()}\n"
            f"    externalIPs: [{ext_ip}]\n"
            f"    loadBalancerIPs: [{lb_ip}]\n"
            f"    ports: [{{port: 0, targetPort: {bp}, nodePort: {node_port}}}]\n"
            f"    endpoints: [{bh}]\n",
            node=f"{{addresses: [{node_ip}]}}",
        )
        async with running(config(text)) as runtime:
            kinds = {listener.spec.kind: listener.bound for listener in runtime.listeners.values()}
            assert set(kinds) == {"clusterIP", "externalIP", "nodePort", "loadBalancerIP"}
            assert kinds["nodePort"] == (node_ip, node_port)
            assert kinds["externalIP"][0] == ext_ip and kinds["loadBalancerIP"][0] == lb_ip
            for host, port in kinds.values():
                assert await read_name(host, port) == "only"


async def test_ipv6_listener_and_endpoint() -> None:
    async with echo_backend("v6", "::1") as (bh, bp, _):
        cfg = config(document(service_yaml("svc", [(bh, bp)], cluster_ip="::1")))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            assert await read_name(host, port) == "v6"


async def test_retry_past_a_dead_endpoint_is_invisible_to_clients() -> None:
    dead_host = fresh_ip()
    async with echo_backend("alive") as (bh, bp, stats):
        cfg = config(document(service_yaml("svc", [(dead_host, dead_port(dead_host)), (bh, bp)])))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            names = [await read_name(host, port) for _ in range(20)]
            route = route_of(runtime)
            route_stats = route.stats
    assert names == ["alive"] * 20
    assert (
        upstream_totals(route).upstream_cx_connect_fail_total == 10
    )  # round-robin sent every other try there
    assert route_stats.upstream_cx_retries_total == 10
    assert stats.connections == 20


async def test_all_endpoints_dead_resets_the_client() -> None:
    hosts = [fresh_ip(), fresh_ip()]
    cfg = config(document(service_yaml("svc", [(h, dead_port(h)) for h in hosts])))
    async with running(cfg) as runtime:
        host, port = address_of(runtime)
        reader, writer = await asyncio.open_connection(host, port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        stats = route_of(runtime).stats
        assert (
            upstream_totals(route_of(runtime)).upstream_cx_connect_fail_total == 2
        )  # each endpoint tried once
        assert stats.upstream_cx_connect_attempts_exceeded_total == 1


async def _connect_and_read(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        data = await asyncio.wait_for(reader.read(), 1)
        assert data != b"", "accepted then closed cleanly: should be refused or reset"
        return data
    finally:
        writer.close()


async def test_should_be_rejected_when_no_endpoints_exist() -> None:
    """Kubernetes e2e "should be rejected when no endpoints exist": ECONNREFUSED at connect,
    within 100 ms, never an accepted connection."""
    cfg = config(document(service_yaml("svc", [])))
    async with running(cfg) as runtime:
        host, port = address_of(runtime)
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await _connect_and_read(host, port)
        assert time.monotonic() - started < 0.1
        assert route_of(runtime).stats.downstream_cx_total == 0


async def test_zero_weight_endpoints_take_no_connections() -> None:
    async with echo_backends(2) as backends:
        (h0, p0, _), (h1, p1, _) = backends
        text = document(
            f"  - name: svc\n    clusterIP: {fresh_ip()}\n    ports: [{{port: 0, targetPort: p}}]\n"
            f"    endpoints:\n      - {{address: {h0}, ports: {{p: {p0}}}, weight: 0}}\n"
            f"      - {{address: {h1}, ports: {{p: {p1}}}}}\n"
        )
        async with running(config(text)) as runtime:
            host, port = address_of(runtime)
            assert {await read_name(host, port) for _ in range(6)} == {"backend-1"}


async def test_connect_timeout_moves_on_to_the_next_endpoint() -> None:
    # A listener whose accept queue is full drops SYNs: connects to it hang (a black hole).
    blackhole = fresh_ip()
    with listening_socket(blackhole, backlog=0) as full:
        # listen(0) queues one connection; this one fills the queue, later SYNs are dropped.
        filler = [socket.create_connection(full.getsockname(), timeout=2)]
        async with echo_backend("alive") as (bh, bp, _):
            text = document(
                service_yaml("svc", [(blackhole, full.getsockname()[1]), (bh, bp)]),
                defaults="{connectTimeout: 400ms}",
            )
            async with running(config(text)) as runtime:
                host, port = address_of(runtime)
                started = time.monotonic()
                names = [await read_name(host, port) for _ in range(2)]
                elapsed = time.monotonic() - started
                totals = upstream_totals(route_of(runtime))
        for sock in filler:
            sock.close()
    assert names == ["alive", "alive"]
    assert totals.upstream_cx_connect_timeout_total == 1
    # The first of two candidates gets a quarter of connectTimeout (escalating tries).
    assert 0.09 < elapsed < 0.4


@contextlib.asynccontextmanager
async def _black_holed() -> AsyncIterator[tuple[Runtime, Route, UpstreamEndpoint]]:
    """lbd in front of one endpoint whose connects hang (its accept queue is full, so SYNs are
    dropped), with a 30 s connectTimeout: a connect stays in flight as long as a test needs."""
    blackhole = fresh_ip()
    with listening_socket(blackhole, backlog=0) as full:
        filler = socket.create_connection(full.getsockname(), timeout=2)  # later SYNs dropped
        try:
            text = document(
                service_yaml("svc", [(blackhole, full.getsockname()[1])]),
                defaults="{connectTimeout: 30s}",
            )
            async with running(config(text)) as runtime:
                route = route_of(runtime)
                [endpoint] = route.pool.members
                yield runtime, route, endpoint
        finally:
            filler.close()


async def test_a_connect_in_flight_is_no_task_and_a_drain_gives_it_up() -> None:
    async with _black_holed() as (runtime, route, endpoint):
        tasks_before = len(asyncio.all_tasks())
        reader, writer = await asyncio.open_connection(*address_of(runtime))
        await until(lambda: endpoint.active == 1, what="the connect to start")
        # The connect in flight is driven by callbacks, not by a Task of its own.
        assert len(asyncio.all_tasks()) == tasks_before
        [connection] = runtime.connections
        connection.start_draining(0.05)  # as a reload or shutdown does, mid-connect
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed, not connected
        await until(lambda: endpoint.active == 0, what="the endpoint to be released")
        writer.close()
        stats, totals = route.stats, upstream_totals(route)
    assert (totals.upstream_cx_connect_timeout_total, totals.upstream_cx_connect_fail_total) == (
        0,
        0,
    )
    assert (totals.upstream_cx_total, stats.downstream_cx_active) == (1, 0)


async def test_a_client_reset_mid_connect_frees_the_connect_at_once() -> None:
    """lbd goes on reading the client while it connects upstream, so a client that resets is
    noticed at once, not after connectTimeout (its try is given up, its endpoint freed). A FIN
    is a half-close, not giving up: that client still gets its answer."""
    async with _black_holed() as (runtime, route, endpoint):
        client = socket.create_connection(address_of(runtime))
        client.sendall(b"early bytes")
        await until(lambda: endpoint.active == 1, what="the connect to start")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        waited = await until(lambda: not runtime.connections, 5, what="the connection to end")
        await until(lambda: endpoint.active == 0, what="the endpoint to be released")
        totals = upstream_totals(route)
    assert waited < 2  # not the 30 s connectTimeout
    assert (totals.upstream_cx_connect_timeout_total, totals.upstream_cx_connect_fail_total) == (
        0,
        0,
    )


async def test_64_mib_each_way_at_once_with_half_close_is_byte_exact() -> None:
    stats = await bulk_exchange(64 * MiB, 64 * MiB)  # checks hashes, counts and the FINs
    assert stats.downstream_cx_total == 1


async def test_half_close_keeps_the_other_direction_open() -> None:
    async with echo_backend("") as (bh, bp, _):
        async with running(config(document(service_yaml("svc", [(bh, bp)])))) as runtime:
            host, port = address_of(runtime)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"request")
            writer.write_eof()  # the client is done sending; it still expects the answer
            assert await asyncio.wait_for(reader.read(), 5) == b"request"
            writer.close()


async def test_slow_reader_keeps_lbd_buffers_bounded() -> None:
    size = 24 * MiB
    max_buffered = 0
    finished = asyncio.Event()

    async def fast_writer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_hashed(writer, size, b"fast")
        writer.close()
        finished.set()

    async with stream_backend(fast_writer) as (bh, bp):
        async with running(config(document(service_yaml("svc", [(bh, bp)])))) as runtime:
            host, port = address_of(runtime)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
            received = 0
            while chunk := await asyncio.wait_for(reader.read(64 * 1024), 10):
                received += len(chunk)
                for connection in runtime.connections:
                    buffered = connection.buffered()
                    if connection.upstream is not None:
                        buffered += connection.upstream.buffered()
                    max_buffered = max(max_buffered, buffered)
                await asyncio.sleep(0.0005)  # a slow reader: about 64 KiB per loop turn
            writer.close()
    assert received == size
    # lbd never holds more than about two socket buffers, not the 24 MiB the backend pushed.
    assert max_buffered < 1 * MiB, max_buffered


async def test_100_concurrent_clients() -> None:
    async with echo_backends(3) as backends:
        cfg = config(
            document(
                service_yaml("svc", [(h, p) for h, p, _ in backends], strategy="least-connection")
            )
        )
        async with running(cfg) as runtime:
            host, port = address_of(runtime)

            async def client(i: int) -> tuple[str, bytes]:
                reader, writer = await asyncio.open_connection(host, port)
                payload = os.urandom(32 * 1024) + str(i).encode()
                name = (await reader.readline()).decode().strip()
                writer.write(payload)
                writer.write_eof()
                echoed = await reader.read()
                writer.close()
                return name, echoed if echoed == payload else b"MISMATCH"

            results = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(100))), 30)
            assert all(echoed != b"MISMATCH" for _, echoed in results)
            counts = Counter(name for name, _ in results)
            assert sum(counts.values()) == 100 and len(counts) == 3
            assert route_of(runtime).stats.downstream_cx_total == 100
            await until(lambda: not runtime.connections, 1, what="every connection to end")
            assert all(ep.active == 0 for ep in route_of(runtime).pool.members)


async def test_upstream_reset_reaches_the_client_as_a_reset() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with stream_backend(resetter) as (bh, bp):
        cfg = config(document(service_yaml("svc", [(bh, bp)])))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"hello")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 5)
            writer.close()


async def test_client_reset_reaches_the_backend_as_a_reset() -> None:
    async with echo_backend("") as (bh, bp, stats):
        async with running(config(document(service_yaml("svc", [(bh, bp)])))) as runtime:
            host, port = address_of(runtime)
            sock = socket.create_connection((host, port))
            sock.sendall(b"x")
            await until(lambda: stats.received > 0, what="the byte to reach the backend")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await asyncio.wait_for(stats.closed.wait(), 5)
    assert stats.resets == 1


async def test_idle_timeout_closes_idle_connections_only() -> None:
    async with echo_backend("") as (bh, bp, _):
        text = document(service_yaml("svc", [(bh, bp)]), defaults="{idleTimeout: 300ms}")
        async with running(config(text)) as runtime:
            host, port = address_of(runtime)
            idle_reader, idle_writer = await asyncio.open_connection(host, port)
            busy_reader, busy_writer = await asyncio.open_connection(host, port)
            started = time.monotonic()
            for _ in range(6):  # 600 ms of traffic every 100 ms: never idle for 300 ms
                busy_writer.write(b"ping")
                assert await asyncio.wait_for(busy_reader.readexactly(4), 1) == b"ping"
                await asyncio.sleep(0.1)
            assert await asyncio.wait_for(idle_reader.read(), 2) == b""  # closed by lbd
            closed_after = time.monotonic() - started
            busy_writer.write(b"pong")
            assert await asyncio.wait_for(busy_reader.readexactly(4), 1) == b"pong"
            for writer in (idle_writer, busy_writer):
                writer.close()
            assert route_of(runtime).stats.downstream_cx_idle_timeout_total == 1
    assert 0.25 < closed_after < 1.0


async def test_client_bytes_sent_before_the_upstream_exists_are_kept() -> None:
    async with echo_backend("") as (bh, bp, _):
        async with running(config(document(service_yaml("svc", [(bh, bp)])))) as runtime:
            host, port = address_of(runtime)
            with socket.create_connection((host, port)) as sock:
                sock.sendall(b"early bytes")  # before lbd has connected upstream
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                received = b""
                while chunk := await asyncio.to_thread(sock.recv, 1024):
                    received += chunk
    assert received == b"early bytes"


async def test_connections_release_their_endpoint_counts() -> None:
    async with echo_backend("x") as (bh, bp, _):
        async with running(
            config(document(service_yaml("svc", [(bh, bp)], strategy="least-connection")))
        ) as runtime:
            host, port = address_of(runtime)
            writers = []
            for _ in range(5):
                reader, writer = await asyncio.open_connection(host, port)
                await reader.readline()
                writers.append(writer)
            endpoint = route_of(runtime).pool.members[0]
            assert endpoint.active == 5
            for writer in writers:
                writer.close()
            await until(lambda: endpoint.active == 0, 1, what="the endpoint to be released")


@pytest.mark.parametrize("faults", ["", "    faults: [{type: latency, latency: 1ms}]\n"])
async def test_ended_connections_leave_no_cyclic_garbage(faults: str) -> None:
    """``Downstream.finish`` breaks every reference cycle of a connection (its two halves,
    the bound methods the reactor held, timers, a faulty connection's pipes): refcounting
    frees 200 ended connections at once, and the cyclic collector finds none of them."""
    loop = asyncio.get_running_loop()

    async def exchange(target: tuple[str, int]) -> None:
        # Raw sockets: the client side leaves no garbage of its own.
        with socket.socket() as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, target)
            await loop.sock_sendall(sock, b"ping")
            got = b""
            while len(got) < 4:
                got += await asyncio.wait_for(loop.sock_recv(sock, 4), 5)

    async with echo_backend() as (bh, bp, _):
        cfg = config(document(service_yaml("svc", [(bh, bp)], extra=faults)))
        async with running(cfg) as runtime:
            target = address_of(runtime)
            await exchange(target)  # the first one makes what lives on (wheels, reactor)
            await until(lambda: not runtime.connections)
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(200):
                    await exchange(target)
                await until(lambda: not runtime.connections)
                gc.collect()
                ours = [o for o in gc.garbage if type(o).__module__.startswith("lbd.")]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
    assert route_of(runtime).stats.downstream_cx_total == 201
    assert ours == []


async def test_both_halves_use_tcp_nodelay() -> None:
    async with echo_backend("x") as (bh, bp, _):
        async with running(config(document(service_yaml("svc", [(bh, bp)])))) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            await reader.readline()
            [connection] = list(runtime.connections)
            assert connection.upstream is not None
            for sock in (connection.sock, connection.upstream.sock):
                assert sock is not None
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            writer.close()


async def test_connections_queued_at_a_backend_that_dies_are_retried_elsewhere() -> None:
    """A backend whose listening socket closes resets every connection still in its accept
    queue. Nothing passed on them either way, so lbd takes each client to another endpoint:
    no client sees the failure (before: one reset client per queued connection)."""
    async with echo_backend("alive") as (bh, bp, _):
        dying_host = fresh_ip()
        dying = socket.socket()
        dying.bind((dying_host, 0))
        dying.listen(64)  # accepts nothing: connections wait in its queue
        dying_port = dying.getsockname()[1]
        cfg = config(document(service_yaml("svc", [(dying_host, dying_port), (bh, bp)])))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            route = route_of(runtime)
            clients = [await asyncio.open_connection(host, port) for _ in range(10)]
            queued = route.pool.find(dying_host)[0]
            await until(lambda: queued.active == 5, what="five connections queued at it")
            dying.close()  # the kernel resets the five
            names = [
                (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
                for reader, _ in clients
            ]
            for _, writer in clients:
                writer.close()
            assert names == ["alive"] * 10
            # Each one was retried: as an early close, or (asyncio's loop, when the reset beats
            # the connect's completion) as a failed connect.
            early = queued.stats.upstream_cx_closed_before_data_total
            assert early + queued.stats.upstream_cx_connect_fail_total == 5 and early >= 4
            assert route.stats.upstream_cx_retries_total == 5


async def test_clients_opening_connections_back_to_back_see_no_failure_when_a_backend_dies() -> (
    None
):
    async with echo_backend("a") as (ah, ap, _), echo_backend("b") as (bh, bp, _):
        dying_host = fresh_ip()
        dying = socket.socket()
        dying.bind((dying_host, 0))
        dying.listen(64)
        cfg = config(
            document(
                service_yaml("svc", [(dying_host, dying.getsockname()[1]), (ah, ap), (bh, bp)])
            )
        )
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            failures: list[str] = []
            done = asyncio.Event()

            async def client() -> None:
                for _ in range(50):  # bounded: 50 connections each
                    try:
                        reader, writer = await asyncio.open_connection(host, port)
                        name = (await asyncio.wait_for(reader.readline(), 5)).strip()
                        writer.close()
                        if name not in (b"a", b"b"):
                            failures.append(f"got {name!r}")
                    except (OSError, TimeoutError) as error:
                        failures.append(repr(error))
                    if done.is_set():
                        return

            clients = [asyncio.create_task(client()) for _ in range(4)]
            await until(lambda: route_of(runtime).pool.find(dying_host)[0].active >= 2)
            dying.close()
            await asyncio.wait_for(asyncio.gather(*clients), 30)
            assert failures == []


@pytest.mark.parametrize(("hash_on", "distinct"), [("clientIP", 1), ("clientIPPort", 3)])
async def test_hash_on_picks_by_client_address_or_address_and_port(
    hash_on: str, distinct: int
) -> None:
    async with echo_backends(3) as backends:
        endpoints = [(h, p) for h, p, _ in backends]
        extra = f"    hashOn: {hash_on}\n    maglevTableSize: 251\n"
        cfg = config(document(service_yaml("svc", endpoints, strategy="maglev", extra=extra)))
        async with running(cfg) as runtime:
            host, port = address_of(runtime)
            names = {await read_name(host, port) for _ in range(40)}  # one client address
    assert len(names) == distinct


async def test_a_client_that_connects_and_closes_gets_a_clean_close() -> None:
    """A client's FIN with no data is passed on; the endpoint's close that answers it is a
    clean close for the client, not a failure to retry elsewhere (health probes do this)."""
    async with echo_backend("") as (bh, bp, _):
        async with running(config(document(service_yaml("svc", [(bh, bp)])))) as runtime:
            reader, writer = await asyncio.open_connection(*address_of(runtime))
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # a FIN, not a reset
            writer.close()
            route = route_of(runtime)
            assert route.stats.upstream_cx_retries_total == 0
            assert upstream_totals(route).upstream_cx_total == 1
