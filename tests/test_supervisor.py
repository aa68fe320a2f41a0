"""``workers: N``: a supervisor and real worker processes, real signals, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterable
from pathlib import Path

import pytest

from lbd.admin.client import AdminTarget, call
from lbd.process.messages import AdminRequest
from lbd.process.workers import Overrides
from tests.procs import LbdProcess, alive, lbd_process, metric, run_cli
from tests.support import (
    dead_port,
    document,
    echo_backend,
    echo_backends,
    fresh_ip,
    read_name,
    service_yaml,
    until,
)

pytestmark = pytest.mark.slow


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lbd.yaml"
    path.write_text(text)
    return path


def with_workers(text: str, workers: int = 2) -> str:
    return text.replace("apiVersion: lbd/v1\n", f"apiVersion: lbd/v1\nworkers: {workers}\n")


async def started(lbd: LbdProcess, workers: int = 2) -> tuple[AdminTarget, list[int]]:
    event = await lbd.wait_event("lbd started", timeout=30)
    assert event["workers"] == workers
    pids = [int(str(e["pid"])) for e in lbd.events if e.get("event") == "worker started"]
    return AdminTarget(address=str(event["admin"])), pids


async def test_workers_serve_sum_metrics_and_stop_cleanly(tmp_path: Path) -> None:
    async with echo_backend("b1") as (bh, bp, stats):
        path = write(tmp_path, with_workers(document(service_yaml("svc", [(bh, bp)]))))
        async with lbd_process(path) as lbd:
            target, pids = await started(lbd)
            assert len(pids) == 2 and all(alive(pid) for pid in pids)
            host, port = lbd.listener()
            for _ in range(40):
                assert await read_name(host, port) == "b1"
            assert stats.connections == 40
            assert await metric(target, "lbd_downstream_cx_total") == 40
            assert await metric(target, "lbd_workers") == 2
            status, body = await call(target, "/readyz")
            assert status == 200 and body["status"] == "ready"
            status, body = await call(target, "/services")
            assert status == 200 and body["services"][0]["endpoints"][0]["address"] == bh
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0
            await lbd.wait_event("lbd stopped")
            assert not any(alive(pid) for pid in pids)


async def test_a_dead_worker_is_replaced_and_counted(tmp_path: Path) -> None:
    async with echo_backend("b1") as (bh, bp, _):
        path = write(tmp_path, with_workers(document(service_yaml("svc", [(bh, bp)]))))
        async with lbd_process(path) as lbd:
            target, pids = await started(lbd)
            os.kill(pids[0], signal.SIGKILL)  # a worker lbd started, by its PID
            await lbd.wait_event("worker exited, restarting")
            await lbd.wait_event("worker started", count=3)
            await lbd.wait_event("worker serving", count=3)
            host, port = lbd.listener()
            for _ in range(20):
                assert await read_name(host, port) == "b1"
            assert await metric(target, "lbd_worker_restarts_total") == 1
            assert await metric(target, "lbd_workers") == 2
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_reload_reaches_every_worker(tmp_path: Path) -> None:
    async with echo_backends(2) as [(h1, p1, _), (h2, p2, _)]:
        ip = fresh_ip()
        port = dead_port(ip)
        text = with_workers(document(service_yaml("svc", [(h1, p1)], cluster_ip=ip, port=port)))
        path = write(tmp_path, text)
        async with lbd_process(path, "--no-watch") as lbd:
            target, _ = await started(lbd)
            # A new service (a new listener, bound once by the supervisor) and a new endpoint.
            other = fresh_ip()
            path.write_text(
                with_workers(
                    document(
                        service_yaml("svc", [(h2, p2)], cluster_ip=ip, port=port),
                        service_yaml("new", [(h2, p2)], cluster_ip=other, port=port),
                    )
                )
            )
            lbd.signal(signal.SIGHUP)
            await lbd.wait_event("config reloaded", count=3)  # each worker, and the supervisor
            reloaded = [e for e in lbd.events if e.get("event") == "config reloaded"]
            assert [e["workers"] for e in reloaded if "worker" not in e] == [2]
            for _ in range(20):  # both workers accept: every connection sees the new config
                assert await read_name(ip, port) == "backend-1"
                assert await read_name(other, port) == "backend-1"
            status, body = await call(target, "/config")
            assert status == 200 and len(body["services"]) == 2
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_least_connection_counts_are_global_across_workers(tmp_path: Path) -> None:
    async with echo_backends(2) as backends:
        eps = [(h, p) for h, p, _ in backends]
        text = with_workers(document(service_yaml("svc", eps, strategy="least-connection")))
        path = write(tmp_path, text)
        async with lbd_process(path) as lbd:
            target, _ = await started(lbd)
            host, port = lbd.listener()
            held: list[asyncio.StreamWriter] = []
            try:
                for _ in range(20):
                    reader, writer = await asyncio.open_connection(host, port)
                    held.append(writer)
                    await asyncio.wait_for(reader.readline(), 5)  # connected to an endpoint
                # Whichever worker took each connection, it saw the others' counts.
                assert [stats.open for _, _, stats in backends] == [10, 10]
                status, body = await call(target, "/services")
                actives = [e["active"] for e in body["services"][0]["endpoints"]]
                assert status == 200 and actives == [10, 10]
                assert await metric(target, "lbd_upstream_cx_active") == 20
            finally:
                for writer in held:
                    writer.close()
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_max_connections_is_global_across_workers(tmp_path: Path) -> None:
    """maxConnections: 3 with 2 workers serves 3 connections in all, not 3 per worker."""
    async with echo_backend("b1") as (bh, bp, stats):
        limits = "    maxConnections: 3\n"  # maxQueue 0: over the limit is reset at once
        text = with_workers(document(service_yaml("svc", [(bh, bp)], extra=limits)))
        path = write(tmp_path, text)
        async with lbd_process(path) as lbd:
            target, _ = await started(lbd)
            host, port = lbd.listener()
            held: list[asyncio.StreamWriter] = []
            refused = 0
            try:
                for _ in range(10):  # spread over both workers by SO_REUSEPORT
                    writer = None
                    try:  # a reset may come before the client's connect completes
                        reader, writer = await asyncio.open_connection(host, port)
                        line = await asyncio.wait_for(reader.readline(), 5)
                    except ConnectionError:
                        line = b""
                    if line and writer is not None:
                        held.append(writer)
                        continue
                    refused += 1
                    if writer is not None:
                        writer.close()
                assert (len(held), refused, stats.open) == (3, 7, 3)
                held.pop().close()  # one ends: its slot is free for the next, in any worker

                # The supervisor sums the workers' metrics.
                async def released() -> bool:
                    return await metric(target, "lbd_downstream_cx_active") == 2

                await until(released, 5, 0.05, what="the ended connection to be released")
                assert await read_name(host, port) == "b1"
            finally:
                for writer in held:
                    writer.close()
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_an_outlier_ejection_reaches_every_worker(tmp_path: Path) -> None:
    """One connect failure ejects the dead endpoint in the worker that saw it, and the other
    worker follows (Envoy ejects per cluster, not per worker thread): no later connection,
    whichever worker takes it, tries the dead endpoint again."""
    dead_host = fresh_ip()
    async with echo_backend("live") as (bh, bp, _):
        outlier = "    outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 60s}\n"
        eps = [(dead_host, dead_port(dead_host)), (bh, bp)]
        text = with_workers(document(service_yaml("svc", eps, extra=outlier)))
        path = write(tmp_path, text)
        async with lbd_process(path) as lbd:
            target, _ = await started(lbd)
            host, port = lbd.listener()
            for _ in range(20):  # round-robin: a worker's first or second pick is the dead one
                assert await read_name(host, port) == "live"  # retried onto the live one
                if await metric(target, "lbd_endpoint_ejections_total") >= 1:
                    break
            else:
                pytest.fail("the dead endpoint was never ejected")
            # The supervisor relayed the ejection before it asked the workers for metrics.
            failures = await metric(target, "lbd_upstream_cx_connect_fail_total")
            for _ in range(20):  # over both workers (SO_REUSEPORT spreads client ports)
                assert await read_name(host, port) == "live"
            assert await metric(target, "lbd_upstream_cx_connect_fail_total") == failures
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_admin_override_reaches_every_worker(tmp_path: Path) -> None:
    async with echo_backends(2) as [(h1, p1, _), (h2, p2, _)]:
        socket_path = tmp_path / "admin.sock"
        text = with_workers(
            document(service_yaml("svc", [(h1, p1), (h2, p2)]), admin=f"{{socket: {socket_path}}}")
        )
        path = write(tmp_path, text)
        async with lbd_process(path) as lbd:
            await lbd.wait_event("lbd started", timeout=30)
            target = AdminTarget(socket=str(socket_path))
            status, body = await call(
                target, "/endpoints/drain", {"service": "svc", "endpoint": h1}, "POST"
            )
            assert status == 200, body
            host, port = lbd.listener()
            names = {await read_name(host, port) for _ in range(20)}
            assert names == {"backend-1"}
            status, body = await call(
                target, "/endpoints/drain", {"service": "svc", "endpoint": "127.9.9.9"}, "POST"
            )
            assert status == 404
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_a_worker_that_cannot_start_stops_lbd_with_exit_3(tmp_path: Path) -> None:
    ip = fresh_ip()
    with contextlib.closing(__import__("socket").socket(2, 2)) as taken:  # UDP, no REUSEPORT
        taken.bind((ip, 0))
        port = taken.getsockname()[1]
        text = with_workers(
            document(service_yaml("svc", [(ip, 9)], cluster_ip=ip, port=port, protocol="UDP"))
        )
        path = write(tmp_path, text)
        async with lbd_process(path) as lbd:
            assert await lbd.wait_exit(30) == 3
            assert any("cannot bind" in line for line in lbd.lines)


async def test_one_worker_probes_health_and_the_others_follow(tmp_path: Path) -> None:
    async with echo_backend("b1") as (bh, bp, _):
        dead = fresh_ip()
        text = with_workers(
            document(
                service_yaml("svc", [(bh, bp), (dead, dead_port(dead))]),
                defaults="{healthCheck: {interval: 100ms, timeout: 1s, unhealthyThreshold: 1}}",
            )
        )
        path = write(tmp_path, text)
        async with lbd_process(path) as lbd:
            target, _ = await started(lbd)
            await lbd.wait_event("endpoint unhealthy")
            host, port = lbd.listener()
            # The verdict reaches the other worker through the supervisor a few ms later (its
            # connections meanwhile fail over to b1): by the end of a first round it has.
            for _ in range(10):
                assert await read_name(host, port) == "b1"
            failed = await metric(target, "lbd_upstream_cx_connect_fail_total")
            for _ in range(30):  # whichever worker accepts, it knows the endpoint is down
                assert await read_name(host, port) == "b1"
            assert await metric(target, "lbd_upstream_cx_connect_fail_total") == failed
            assert await metric(target, "lbd_health_checkers_active") == 2  # not 4
            probers = {
                e.get("worker") for e in lbd.events if e.get("event") == "endpoint unhealthy"
            }
            assert probers == {0}
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


async def test_bad_workers_option_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path, document(service_yaml("svc", [(fresh_ip(), 80)])))
    for bad in ("0", "many"):
        code, _, err = await run_cli("run", str(path), "--workers", bad)
        assert code == 2 and "--workers" in err


async def test_workers_refuse_connections_to_a_port_without_endpoints(tmp_path: Path) -> None:
    # The supervisor keeps a copy of every worker's listening socket, so a worker stops
    # listening by shutdown(): the kernel refuses every connect (kube-proxy's REJECT), and a
    # port that gets an endpoint by reload is served again by every worker.
    ip = fresh_ip()
    path = write(tmp_path, with_workers(document(service_yaml("svc", [], cluster_ip=ip))))
    async with lbd_process(path, "--no-watch") as lbd:
        await started(lbd)
        host, port = lbd.listener()
        for _ in range(4):
            with pytest.raises(ConnectionRefusedError):
                await read_name(host, port)
        async with echo_backend("late") as (bh, bp, _):
            path.write_text(with_workers(document(service_yaml("svc", [(bh, bp)], cluster_ip=ip))))
            lbd.signal(signal.SIGHUP)
            await lbd.wait_event("config reloaded", timeout=10)

            async def late() -> bool:
                with contextlib.suppress(ConnectionRefusedError):
                    return await read_name(host, port) == "late"
                return False

            await until(late, 2, 0.01, what="every worker to serve the new endpoint")
        lbd.signal(signal.SIGTERM)
        assert await lbd.wait_exit(timeout=20) == 0


async def test_client_ip_affinity_holds_whichever_worker_accepts(tmp_path: Path) -> None:
    """sessionAffinity: ClientIP with two workers sharing the listening socket: every client's
    connections reach one backend, though the workers accept them in turn."""
    async with echo_backends(4) as backends:
        eps = [(h, p) for h, p, _ in backends]
        extra = "    sessionAffinity: ClientIP\n    accessLog: true\n"
        text = with_workers(document(service_yaml("svc", eps, strategy="random", extra=extra)))
        async with lbd_process(write(tmp_path, text)) as lbd:
            await started(lbd)
            host, port = lbd.listener()
            clients = [fresh_ip() for _ in range(12)]
            seen: dict[str, set[str]] = {client: set() for client in clients}
            for _ in range(5):
                for client in clients:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, port, local_addr=(client, 0)), 5
                    )
                    seen[client].add((await asyncio.wait_for(reader.readline(), 5)).decode())
                    writer.close()
            assert all(len(names) == 1 for names in seen.values()), seen
            # Both workers took connections, else this test would prove nothing. A connection
            # id starts with its worker's pid (access log).
            await lbd.wait_event("connection closed", count=60)
            closed = [e for e in lbd.events if e.get("event") == "connection closed"]
            assert len({str(e["connection"]).split("-")[0] for e in closed}) == 2
            lbd.signal(signal.SIGTERM)
            assert await lbd.wait_exit() == 0


def test_replayed_overrides_stay_bounded_and_replay_to_the_same_state() -> None:
    """A replacement worker replays the latest override per kind and target, in order: what
    the whole history left, from a list bounded by the endpoints (not by the requests)."""

    def request(view: str, port: str = "", weight: str = "") -> AdminRequest:
        query = {"service": "svc", "endpoint": "127.0.1.1"}
        query.update({k: v for k, v in (("port", port), ("weight", weight)) if v})
        return AdminRequest(view=view, query=query)

    def drained_ports(requests: Iterable[AdminRequest]) -> set[str]:
        state = {"80": False, "443": False}
        for r in requests:
            if r.view in ("drain", "enable"):
                for port in [r.query["port"]] if "port" in r.query else list(state):
                    state[port] = r.view == "drain"
        return {port for port, drained in state.items() if drained}

    history = [
        request("drain"),
        request("enable", port="80"),
        request("weight", weight="3"),
        request("drain"),
        request("enable", port="443"),
        *(request("weight", weight=str(n)) for n in range(1000)),
    ]
    overrides = Overrides()
    for r in history:
        overrides.made(r)
    assert len(overrides) == 4
    assert drained_ports(overrides) == drained_ports(history) == {"80"}
    assert [r.query.get("weight") for r in overrides if r.view == "weight"] == ["999"]
