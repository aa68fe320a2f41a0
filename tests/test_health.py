"""Active health checks: thresholds, one checker per endpoint, and the acceptance tests."""

from __future__ import annotations

import asyncio
import contextlib
import random

from lbd.config.model import HealthCheck
from lbd.endpoints.pool import Pool
from lbd.health.registry import Checker, HealthRegistry, HealthStats
from tests.support import (
    BackendStats,
    NamedEcho,
    address_of,
    close_transports,
    config,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    read_name,
    route_of,
    running,
    service_yaml,
    tcp_server,
    until,
)

FAST = "{interval: 200ms, timeout: 200ms, healthyThreshold: 2, unhealthyThreshold: 3}"
INTERVAL, TIMEOUT, RISE, FALL = 0.2, 0.2, 2, 3
MARGIN = 1.5  # a loaded CI machine: seen above 0.5 s with a second suite and a CPU burner beside it


def test_only_threshold_crossings_change_state() -> None:
    pool = Pool(name="t")
    pool.update([("127.0.0.1", 80, 1), ("127.0.0.2", 80, 1)])
    checker = Checker(("127.0.0.1", 80, HealthCheck()), HealthStats(), random.Random(1))
    checker.subscribers.add(pool)
    results = ["refused", "refused", None, "refused", "refused", "refused", None, None]
    states = []
    for reason in results:
        checker.record(reason)
        states.append(pool.members[0].healthy)
    # fall 3: down on the 3rd failure in a row; rise 2: up on the 2nd success in a row.
    assert states == [True, True, True, True, True, False, False, True]
    assert checker.stats.health_transitions_total.unhealthy == 1
    assert checker.stats.health_transitions_total.healthy == 1
    assert checker.stats.health_check_failures_total == 5 and checker.stats.health_checks_total == 8
    assert [m.address for m in pool.eligible()] == ["127.0.0.1", "127.0.0.2"]


def test_every_endpoint_down_is_panic_mode_using_all() -> None:
    pool = Pool(name="t")
    pool.update([("127.0.0.1", 80, 1), ("127.0.0.2", 80, 1)])
    pool.set_healthy(("127.0.0.1", 80), False)
    assert [m.address for m in pool.eligible()] == ["127.0.0.2"] and not pool.panic
    pool.set_healthy(("127.0.0.2", 80), False)
    assert len(pool.eligible()) == 2 and pool.panic and pool.panics == 1
    pool.set_healthy(("127.0.0.2", 80), True)
    assert [m.address for m in pool.eligible()] == ["127.0.0.2"] and not pool.panic


async def test_ports_sharing_an_endpoint_share_one_checker_and_removal_stops_it() -> None:
    registry = HealthRegistry()
    check = HealthCheck(interval=60.0)
    a, b = Pool(name="a"), Pool(name="b")
    a.update([("127.0.0.1", 9, 1), ("127.0.0.2", 9, 1)])
    b.update([("127.0.0.1", 9, 1)])
    registry.sync(a, check)
    registry.sync(b, check)
    assert len(registry) == 2 and registry.stats.health_checkers_active == 2
    shared = registry.checker("127.0.0.1", 9, check)
    assert shared is not None and shared.subscribers == {a, b}
    a.update([("127.0.0.2", 9, 1)])  # a reload drops the shared endpoint from a
    registry.sync(a, check)
    assert shared.subscribers == {b} and len(registry) == 2
    registry.sync(b, None)  # b's checks switched off
    assert len(registry) == 1 and shared.task is not None and shared.task.cancelling()
    registry.close()
    await registry.wait_closed()
    assert len(registry) == 0 and registry.stats.health_checkers_active == 0


async def test_a_pool_joining_a_down_endpoint_learns_it_at_once() -> None:
    registry = HealthRegistry()
    check = HealthCheck(interval=60.0)
    a, b = Pool(name="a"), Pool(name="b")
    a.update([("127.0.0.1", 9, 1), ("127.0.0.3", 9, 1)])
    registry.sync(a, check)
    checker = registry.checker("127.0.0.1", 9, check)
    assert checker is not None
    for _ in range(3):
        checker.record("refused")
    b.update([("127.0.0.1", 9, 1), ("127.0.0.2", 9, 1)])
    registry.sync(b, check)
    assert [m.address for m in b.eligible()] == ["127.0.0.2"]
    registry.close()
    await registry.wait_closed()


async def load_until(host: str, port: int, stop: asyncio.Event, results: list[str]) -> None:
    while not stop.is_set():
        try:
            results.append(await read_name(host, port, timeout=5.0))
        except (OSError, TimeoutError) as error:
            results.append(f"failed: {error!r}")


async def test_kill_a_backend_under_load_then_restart_it() -> None:
    async with echo_backend("steady") as (h0, p0, _):
        victim_host = fresh_ip()
        victim = BackendStats()
        server_cm = tcp_server(lambda: NamedEcho("victim", victim), victim_host)
        async with contextlib.AsyncExitStack() as stack:
            _, victim_port, server = await stack.enter_async_context(server_cm)
            cfg = config(
                document(
                    service_yaml("svc", [(h0, p0), (victim_host, victim_port)]),
                    defaults=f"{{healthCheck: {FAST}}}",
                )
            )
            runtime = await stack.enter_async_context(running(cfg))
            host, port = address_of(runtime)
            pool = route_of(runtime).pool
            stop = asyncio.Event()
            results: list[str] = []
            clients = [asyncio.create_task(load_until(host, port, stop, results)) for _ in range(4)]
            await until(lambda: results.count("victim") >= 5, 10)

            server.close()  # the victim stops accepting: new connects are refused
            victim_member = pool.member((victim_host, victim_port))
            assert victim_member is not None
            took_down = await until(lambda: not victim_member.healthy, 10)
            assert took_down <= INTERVAL * FALL + TIMEOUT + MARGIN

            restarted = await asyncio.get_running_loop().create_server(
                lambda: NamedEcho("victim", victim), victim_host, victim_port
            )
            try:
                took_up = await until(lambda: victim_member.healthy, 10)
                seen = len(results)
                await until(lambda: "victim" in results[seen:], 10)
            finally:
                stop.set()
                await asyncio.gather(*clients)
                restarted.close()
                await close_transports(victim.transports)
    assert took_up <= INTERVAL * RISE + TIMEOUT + MARGIN
    failures = [r for r in results if r.startswith("failed")]
    assert failures == [] and len(results) > 20
    assert runtime.health.stats.health_transitions_total.unhealthy == 1
    assert runtime.health.stats.health_transitions_total.healthy == 1


async def test_all_backends_down_is_panic_mode_and_logged() -> None:
    async with echo_backends(2) as backends:
        cfg = config(
            document(
                service_yaml("svc", [(h, p) for h, p, _ in backends]),
                defaults="{healthCheck: {interval: 100ms, timeout: 100ms, unhealthyThreshold: 1, "
                "type: tcp, send: 'x', expect: 'never'}}",
            )
        )
        async with running(cfg) as runtime:
            pool = route_of(runtime).pool
            await until(lambda: pool.panic, 5)
            assert all(not m.healthy for m in pool.members) and len(pool.eligible()) == 2
            # Still served: panic mode uses every endpoint rather than refusing.
            host, port = address_of(runtime)
            assert (await read_name(host, port)).startswith("backend-")
            assert pool.panics == 1


class TinyHttp(asyncio.Protocol):
    """Answers any request with ``status`` and closes; records the request head."""

    def __init__(self, status: int, seen: list[bytes]) -> None:
        self.status = status
        self.seen = seen
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.seen.append(data)
        assert self.transport is not None
        if b"\r\n\r\n" in b"".join(self.seen):
            self.transport.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
            self.transport.close()


async def test_http_check_status_range_path_and_host() -> None:
    seen_ok: list[bytes] = []
    seen_bad: list[bytes] = []
    async with tcp_server(lambda: TinyHttp(204, seen_ok)) as (h1, p1, _):
        async with tcp_server(lambda: TinyHttp(503, seen_bad)) as (h2, p2, _):
            cfg = config(
                document(
                    service_yaml(
                        "svc",
                        [(h1, p1), (h2, p2)],
                        extra="    healthCheck: {type: http, path: /healthz, host: svc.local, "
                        "interval: 100ms, timeout: 100ms, unhealthyThreshold: 2}\n",
                    )
                )
            )
            async with running(cfg) as runtime:
                pool = route_of(runtime).pool
                await until(lambda: [m.address for m in pool.eligible()] == [h1], 5)
                await asyncio.sleep(0.3)  # several more rounds: the 204 one stays up
                assert [m.address for m in pool.eligible()] == [h1]
    request = b"".join(seen_ok)
    assert request.startswith(b"GET /healthz HTTP/1.1\r\nHost: svc.local\r\n")


async def test_reload_starts_and_stops_checkers_with_the_endpoints() -> None:
    async with echo_backends(3) as backends:
        (h0, p0, _), (h1, p1, _), (h2, p2, _) = backends
        cluster_ip = fresh_ip()
        checks = "{healthCheck: {interval: 1s}}"

        def cfg(endpoints: list[tuple[str, int]], defaults: str = checks) -> object:
            return config(
                document(service_yaml("svc", endpoints, cluster_ip=cluster_ip), defaults=defaults)
            )

        async with running(cfg([(h0, p0), (h1, p1)])) as runtime:  # type: ignore[arg-type]
            keys = lambda: {(c.address, c.port) for c in runtime.health._checkers.values()}  # noqa: E731
            assert keys() == {(h0, p0), (h1, p1)}
            await runtime.apply(cfg([(h1, p1), (h2, p2)]))  # type: ignore[arg-type]
            assert keys() == {(h1, p1), (h2, p2)}
            await runtime.apply(cfg([(h1, p1), (h2, p2)], defaults=""))  # type: ignore[arg-type]
            assert keys() == set() and runtime.health.stats.health_checkers_active == 0
