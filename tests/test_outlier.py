"""Passive outlier ejection: thresholds, growing ejection times, the percentage cap."""

from __future__ import annotations

import asyncio

from lbd.config.model import OutlierDetection
from lbd.endpoints.outlier import OutlierDetector
from lbd.endpoints.pool import Pool
from lbd.shm.counts import EndpointSlots, SharedCounts
from tests.support import (
    BackendStats,
    NamedEcho,
    address_of,
    close_transports,
    config,
    dead_port,
    document,
    echo_backend,
    fresh_ip,
    read_name,
    route_of,
    running,
    service_yaml,
    tcp_server,
    until,
    upstream_totals,
)


def pool_of(count: int) -> Pool:
    pool = Pool(name="t")
    pool.update([(f"127.0.0.{i + 1}", 80, 1) for i in range(count)])
    return pool


async def test_consecutive_failures_eject_and_success_resets_the_count() -> None:
    pool = pool_of(3)
    a, b, _ = pool.members
    spec = OutlierDetection(
        consecutive_failures=3, base_ejection_time=60.0, max_ejection_percent=100
    )
    detector = OutlierDetector(pool, spec)
    detector.connect_failed(a)
    detector.connect_failed(a)
    detector.connect_succeeded(a)
    detector.connect_failed(a)
    detector.connect_failed(a)
    assert not a.ejected
    detector.connect_failed(a)
    assert a.ejected and a not in pool.eligible() and detector.ejections_total == 1
    assert b in pool.eligible()


async def test_max_ejection_percent_caps_ejections_at_least_one() -> None:
    pool = pool_of(3)
    a, b, _ = pool.members
    detector = OutlierDetector(
        pool,
        OutlierDetection(consecutive_failures=1, base_ejection_time=60.0, max_ejection_percent=10),
    )
    detector.connect_failed(a)
    detector.connect_failed(b)
    assert a.ejected and not b.ejected  # 10% of 3 is 0, but Envoy ejects at least one
    assert detector.ejections_overflow_total == 1
    none = OutlierDetector(
        pool_of(3), OutlierDetection(consecutive_failures=1, max_ejection_percent=0)
    )
    first = none.pool.members[0]
    none.connect_failed(first)
    assert not first.ejected


async def test_ejection_expires_and_grows_with_each_ejection() -> None:
    pool = pool_of(2)
    a = pool.members[0]
    spec = OutlierDetection(
        consecutive_failures=1,
        base_ejection_time=0.3,
        max_ejection_time=0.5,
        max_ejection_percent=50,
    )
    detector = OutlierDetector(pool, spec)
    assert [detector.ejection_time(n) for n in (1, 2, 3)] == [0.3, 0.5, 0.5]
    loop = asyncio.get_running_loop()
    start = loop.time()
    detector.connect_failed(a)
    await until(lambda: not a.ejected, 5)
    first = loop.time() - start
    start = loop.time()
    detector.connect_failed(a)
    await until(lambda: not a.ejected, 5)
    second = loop.time() - start
    # uvloop's timers have millisecond resolution: allow them 10 ms early.
    assert 0.29 <= first < 0.3 + 0.5 and 0.49 <= second < 0.5 + 0.5


async def test_an_ejection_announced_by_another_worker_is_followed_once_counted() -> None:
    """Workers: the worker that saw the failures ejects and announces; another worker follows
    for the same time, within its own maxEjectionPercent, without counting it again; an early
    return (a passing active check) is announced and followed the same way."""
    key = ("default/svc", "80")
    announced: list[tuple[object, str, int, float]] = []
    region = SharedCounts.create(workers=2, slots=8)
    views = [SharedCounts(region.fd, 2, 8, worker=w) for w in (0, 1)]
    try:
        pools = []
        for view in views:
            slots = EndpointSlots(view, {})
            slots.announce_ejection = lambda *ejection: announced.append(ejection)
            pool = Pool(name="t", slots=slots, route_key=key)
            pool.update([(f"127.0.0.{i + 1}", 80, 1) for i in range(4)])
            pools.append(pool)
        spec = OutlierDetection(
            consecutive_failures=2, base_ejection_time=0.2, max_ejection_percent=25
        )
        deciding, following = (OutlierDetector(pool, spec) for pool in pools)
        for _ in range(2):
            deciding.connect_failed(pools[0].members[0])
        assert announced == [(key, "127.0.0.1", 80, 0.2)]
        there = pools[1].member(("127.0.0.1", 80))
        assert there is not None
        following.follow(there, 0.2)
        assert there.ejected and there not in pools[1].eligible()
        assert (following.ejections_total, there.stats.endpoint_ejections_total) == (
            0,
            0,
        )  # counted once
        other = pools[1].member(("127.0.0.2", 80))
        assert other is not None
        following.follow(other, 0.2)  # 25 % of 4: one out at a time, here too
        assert not other.ejected
        assert len(announced) == 1  # following never announces
        # The probing worker's check passes: back at once there, announced with 0 seconds.
        deciding.check_passed(pools[0].members[0])
        assert not pools[0].members[0].ejected
        assert announced[1] == (key, "127.0.0.1", 80, 0.0)
        following.follow(there, 0.0)
        assert not there.ejected and there in pools[1].eligible()
    finally:
        for view in views:
            view.values.release()
            view.affinity.release()
        region.close()


async def test_connect_failures_through_lbd_eject_the_dead_endpoint() -> None:
    dead_host = fresh_ip()
    async with echo_backend("alive") as (host, port, _):
        cfg = config(
            document(
                service_yaml(
                    "svc",
                    [(host, port), (dead_host, dead_port(dead_host))],
                    extra="    outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 500ms, "
                    "maxEjectionPercent: 50}\n",
                )
            )
        )
        async with running(cfg) as runtime:
            route = route_of(runtime)
            lb_host, lb_port = address_of(runtime)
            names = [await read_name(lb_host, lb_port) for _ in range(6)]
            assert names == ["alive"] * 6  # the retries hide the dead endpoint from clients
            dead = route.pool.member((dead_host, route.pool.members[1].port))
            assert dead is not None and dead.ejected
            fails = upstream_totals(route).upstream_cx_connect_fail_total
            assert fails == 2
            names = [await read_name(lb_host, lb_port) for _ in range(6)]
            assert (
                upstream_totals(route).upstream_cx_connect_fail_total == fails
            )  # not tried while ejected
            took = await until(lambda: not dead.ejected, 5)
            assert took <= 0.5 + 0.5
            assert route.outlier is not None and route.outlier.ejections_total == 1


async def test_a_passing_active_check_ends_an_ejection_early() -> None:
    """Envoy's successful_active_health_check_uneject_host: the endpoint comes back up, its
    next passing check returns it at once instead of after the 60 s ejection."""
    host = fresh_ip()
    port = dead_port(host)  # nothing listens yet: connects to it are refused
    async with echo_backend("steady") as (steady_host, steady_port, _):
        extra = (
            "    outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 60s, "
            "maxEjectionPercent: 50}\n"
            "    healthCheck: {interval: 100ms, timeout: 100ms, unhealthyThreshold: 100}\n"
        )
        eps = [(steady_host, steady_port), (host, port)]
        async with running(config(document(service_yaml("svc", eps, extra=extra)))) as runtime:
            route = route_of(runtime)
            back = route.pool.member((host, port))
            assert back is not None
            lb_host, lb_port = address_of(runtime)
            for _ in range(4):  # round-robin reaches it: refused, ejected, retried elsewhere
                assert await read_name(lb_host, lb_port) == "steady"
            assert back.ejected and back.healthy  # 100 failed checks before unhealthy
            stats = BackendStats()
            async with tcp_server(lambda: NamedEcho("back", stats), host, port):
                try:
                    took = await until(lambda: not back.ejected, 5)
                    assert took < 2.0  # a check or two, not the 60 s ejection
                    names = {await read_name(lb_host, lb_port) for _ in range(4)}
                    assert names == {"steady", "back"}
                finally:
                    await close_transports(stats.transports)
            assert route.outlier is not None and route.outlier.ejections_total == 1


async def test_an_early_return_cancels_the_ejections_own_end() -> None:
    """Ejected, returned early by a passing check, ejected again: the first ejection's timer
    must not end the second one."""
    pool = pool_of(2)
    a, _ = pool.members
    spec = OutlierDetection(consecutive_failures=1, base_ejection_time=0.2, max_ejection_percent=50)
    detector = OutlierDetector(pool, spec)
    pool.on_check_passed = detector.check_passed
    detector.connect_failed(a)
    assert a.ejected
    pool.check_passed(a.key)
    assert not a.ejected
    detector.connect_failed(a)  # out again, now for 2 x 0.2 s
    await asyncio.sleep(0.3)  # past the first ejection's end
    assert a.ejected
    await until(lambda: not a.ejected, 5)


async def test_an_endpoint_removed_while_ejected_comes_back_unejected() -> None:
    """Ejected, removed by a reload while it still has a connection, its ejection ends, then a
    reload adds it back: it is eligible again, not ejected for good."""
    pool = pool_of(2)
    a, b = pool.members
    spec = OutlierDetection(consecutive_failures=1, base_ejection_time=0.1, max_ejection_percent=50)
    detector = OutlierDetector(pool, spec)
    detector.connect_failed(a)
    pool.acquire(a)  # a connection still open on it: it drains rather than disappears
    pool.update([(b.address, b.port, 1)])
    assert a.draining and a.ejected
    await until(lambda: not a.ejected, 5)  # the ejection ends during the drain
    pool.update([(a.address, a.port, 1), (b.address, b.port, 1)])
    assert pool.member(a.key) is a and a in pool.eligible()
