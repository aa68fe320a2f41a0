"""Metrics: known traffic gives exact values on /metrics; names follow Prometheus conventions;
worker snapshots merge by each metric's rule."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbd.admin.client import AdminTarget
from lbd.observability.metric_spec import SCOPE_LABELS
from lbd.observability.metrics import METRICS
from lbd.observability.snapshot import (
    Snapshot,
    SnapshotCollector,
    WorkerSnapshots,
    merge,
    read_stats,
)
from lbd.observability.stats import (
    CX_LENGTH_SECONDS_BUCKETS,
    Buckets,
    EndpointStats,
    FaultStats,
    HealthStats,
    KubernetesKindStats,
    KubernetesStats,
    NodeAddressStats,
    ProcessStats,
    RouteStats,
    SupervisorStats,
)
from tests.support import (
    admin_running,
    config,
    dead_port,
    document,
    echo_backend,
    fresh_ip,
    service_yaml,
    udp_client,
    udp_echo_backend,
    until,
)

REPO = Path(__file__).resolve().parent.parent
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(target: AdminTarget) -> Series:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{target.address}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(port: str = "0", service: str = "svc", **extra: str) -> frozenset[tuple[str, str]]:
    return frozenset({"namespace": "default", "service": service, "port": port, **extra}.items())


async def exchange(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_known_traffic_gives_exact_counter_values() -> None:
    dead_host = fresh_ip()
    dead = (dead_host, dead_port(dead_host))
    async with echo_backend("backend-a") as (bh, bp, _):
        text = document(
            service_yaml("svc", [(bh, bp), dead]),
            service_yaml("empty", []),
        )
        async with admin_running(config(text)) as (runtime, target):
            host, port = runtime.listener_for("default/svc").bound
            for _ in range(4):
                assert await exchange(host, port, b"x" * 100) == b"backend-a\n" + b"x" * 100
            empty_host, empty_port = runtime.listener_for("default/empty").bound
            with pytest.raises(ConnectionRefusedError):  # REJECT: not listening, no endpoint
                await asyncio.wait_for(asyncio.open_connection(empty_host, empty_port), 5)
            await asyncio.wait_for(runtime.connections.wait_empty(), 5)
            series = await scrape(target)
            config_hash = runtime.config_hash

    live = labels(endpoint=f"{bh}:{bp}")
    down = labels(endpoint=f"{dead[0]}:{dead[1]}")
    sent_to_client = 4 * (len(b"backend-a\n") + 100)
    expected = {
        ("lbd_downstream_cx_total", labels()): 4,
        ("lbd_downstream_cx_active", labels()): 0,
        ("lbd_downstream_cx_refused_total", labels(reason="no_endpoint")): 0,
        # Refused by the kernel (the listener is closed), so never seen by lbd.
        ("lbd_downstream_cx_refused_total", labels(service="empty", reason="no_endpoint")): 0,
        ("lbd_downstream_cx_total", labels(service="empty")): 0,
        ("lbd_downstream_bytes_received_total", labels()): 400,
        ("lbd_downstream_bytes_sent_total", labels()): sent_to_client,
        ("lbd_downstream_cx_length_seconds_count", labels()): 4,
        # Round-robin over a live and a dead endpoint: half the first tries fail, and each
        # of those retries on the live one.
        ("lbd_upstream_cx_retries_total", labels()): 2,
        ("lbd_upstream_cx_connect_attempts_exceeded_total", labels()): 0,
        ("lbd_upstream_cx_total", live): 4,
        ("lbd_upstream_cx_total", down): 2,
        ("lbd_upstream_cx_connect_fail_total", live): 0,
        ("lbd_upstream_cx_connect_fail_total", down): 2,
        ("lbd_upstream_cx_connect_timeout_total", down): 0,
        ("lbd_upstream_cx_active", live): 0,
        ("lbd_upstream_bytes_sent_total", live): 400,
        ("lbd_upstream_bytes_received_total", live): sent_to_client,
        ("lbd_upstream_bytes_sent_total", down): 0,
        ("lbd_upstream_cx_connect_seconds_count", live): 4,
        ("lbd_upstream_cx_connect_seconds_count", down): 0,
        ("lbd_endpoint_weight", live): 1,
        ("lbd_endpoint_eligible", live): 1,
        ("lbd_endpoint_healthy", live): 1,
        ("lbd_endpoint_ejections_total", live): 0,
        ("lbd_config_reloads_total", frozenset({"result": "success"}.items())): 0,
        ("lbd_config_reloads_total", frozenset({"result": "failure"}.items())): 0,
        ("lbd_config_info", frozenset({"hash": config_hash}.items())): 1,
    }
    assert {key: series.get(key) for key in expected} == expected
    # A histogram's +Inf bucket holds every observation, and no client address is a label.
    assert series[("lbd_downstream_cx_length_seconds_bucket", labels(le="+Inf"))] == 4
    assert all(bh not in dict(key[1]).get("client", "") for key in series)
    assert any(name == "process_resident_memory_bytes" for name, _ in series)


async def test_bytes_of_open_connections_count_before_they_close() -> None:
    async with echo_backend("b") as (bh, bp, _):
        async with admin_running(config(document(service_yaml("svc", [(bh, bp)])))) as (
            runtime,
            target,
        ):
            host, port = runtime.listener_for("default/svc").bound
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
            try:
                writer.write(b"y" * 1000)
                got = b""
                while len(got) < 1002:
                    got += await asyncio.wait_for(reader.read(4096), 5)
                series = await scrape(target)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
    assert series[("lbd_downstream_cx_active", labels())] == 1
    assert series[("lbd_downstream_bytes_received_total", labels())] == 1000
    assert series[("lbd_upstream_bytes_received_total", labels(endpoint=f"{bh}:{bp}"))] == 1002


def test_names_follow_prometheus_conventions() -> None:
    for spec in METRICS.values():
        assert re.fullmatch(r"lbd_[a-z_]+", spec.name), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds") and spec.buckets, spec.name
        assert not {"client", "client_ip", "source"} & set(spec.labels), spec.name
    for name in (
        "lbd_downstream_cx_total",
        "lbd_downstream_cx_active",
        "lbd_upstream_cx_total",
        "lbd_upstream_cx_active",
        "lbd_upstream_cx_connect_fail_total",
        "lbd_upstream_cx_connect_timeout_total",
        "lbd_downstream_bytes_received_total",
    ):
        assert name in METRICS


SCOPE_STATS = {
    "route": RouteStats,
    "endpoint": EndpointStats,
    "health": HealthStats,
    "process": ProcessStats,
    "supervisor": SupervisorStats,
    "node": NodeAddressStats,
    "kubernetes": KubernetesStats,
    "kubernetes_kind": KubernetesKindStats,
    "fault": FaultStats,
}


def test_every_metric_is_named_after_the_stats_field_it_reads() -> None:
    """The name is generated from the field (lbd_ + field), the field exists on its scope's
    stats object, and a labelled metric's label values are the fields of its family."""
    for spec in METRICS.values():
        stats = SCOPE_STATS[spec.scope]()
        assert spec.name == f"lbd_{spec.field}"
        value = getattr(stats, spec.field)  # AttributeError: a metric reads no stats field
        if spec.label is not None:
            assert dataclasses.is_dataclass(value), spec.name
            assert all(isinstance(getattr(value, f.name), int) for f in dataclasses.fields(value))
        elif spec.kind == "histogram":
            assert isinstance(value, Buckets) and value.bounds == spec.buckets, spec.name
        elif spec.kind == "info":
            assert isinstance(value, tuple) and len(value) == len(spec.info), spec.name
        else:
            assert isinstance(value, int | float), spec.name


def test_a_snapshot_exports_exactly_the_table() -> None:
    """Reading every scope's stats gives one series name per metric, and every name read is
    in the table: no metric is built by hand anywhere else."""
    snap = Snapshot()
    for scope, stats in SCOPE_STATS.items():
        labels = ("a",) * len(SCOPE_LABELS[scope])  # type: ignore[index]
        read_stats(snap, scope, stats(), labels, udp=True)  # type: ignore[arg-type]
    assert set(snap.values) | set(snap.histograms) == set(METRICS)


def test_merge_sums_counts_and_takes_the_max_of_state() -> None:
    route = ("default", "svc", "http")
    endpoint = (*route, "127.0.0.1:80")

    def worker(cx: int, active: int, weight: int, length: list[int]) -> Snapshot:
        snap = Snapshot()
        snap.add("lbd_downstream_cx_total", route, cx)
        snap.add("lbd_downstream_cx_active", route, active)
        snap.add("lbd_endpoint_weight", endpoint, weight)
        snap.add("lbd_config_reloads_total", ("success",), 1)
        snap.set_histogram("lbd_downstream_cx_length_seconds", route, length, 2.5)
        return snap

    total = merge([worker(3, 1, 5, [1, 0, 2]), worker(4, 2, 5, [0, 1, 1])])
    assert total.value("lbd_downstream_cx_total", *route) == 7
    assert total.value("lbd_downstream_cx_active", *route) == 3
    assert total.value("lbd_endpoint_weight", *endpoint) == 5
    assert total.value("lbd_config_reloads_total", "success") == 1
    assert total.histograms["lbd_downstream_cx_length_seconds"][route] == ([1, 1, 3], 5.0)

    workers = WorkerSnapshots()
    workers.update(1, worker(3, 1, 5, [1, 0, 2]))
    workers.update(2, worker(4, 2, 5, [0, 1, 1]))
    workers.retire(1)  # worker 1 exits: its counters stay in the sum, its gauges go
    workers.update(3, worker(0, 0, 5, [0, 0, 0]))
    after = workers.total()
    assert after.value("lbd_downstream_cx_total", *route) == 7
    assert after.value("lbd_downstream_cx_active", *route) == 2
    assert after.value("lbd_endpoint_weight", *endpoint) == 5


def test_collector_renders_cumulative_buckets() -> None:
    buckets = Buckets(CX_LENGTH_SECONDS_BUCKETS)
    for value in (0.003, 0.5, 0.5, 99999.0):
        buckets.observe(value)
    snap = Snapshot()
    route = ("default", "svc", "http")
    snap.set_histogram("lbd_downstream_cx_length_seconds", route, buckets.counts, buckets.total)
    family = next(
        f
        for f in SnapshotCollector(lambda: snap).collect()
        if f.name == "lbd_downstream_cx_length_seconds"
    )
    values = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert values["0.001"] == 0
    assert values["0.005"] == 1
    assert values["0.5"] == 3  # le is inclusive
    assert values["14400.0"] == 3
    assert values["+Inf"] == 4


def test_grafana_dashboard_uses_only_defined_metrics() -> None:
    dashboard = json.loads((REPO / "configs" / "grafana-dashboard.json").read_text())
    expressions = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    assert expressions
    known = set(METRICS) | {
        f"{name}_{suffix}"
        for name, spec in METRICS.items()
        if spec.kind == "histogram"
        for suffix in ("bucket", "sum", "count")
    }
    used = {name for expr in expressions for name in re.findall(r"\blbd_[a-z_]+", expr)}
    assert used and used <= known, used - known


async def test_two_admin_servers_in_one_process_do_not_collide() -> None:
    """Each admin server has its own registry, not prometheus-client's global one."""
    cfg = config(document(service_yaml("svc", [])))
    other = dataclasses.replace(cfg, admin=dataclasses.replace(cfg.admin, address=fresh_ip()))
    async with admin_running(cfg) as (_, first), admin_running(other) as (_, second):
        assert first != second
        for target in (first, second):
            assert (await scrape(target))[("lbd_downstream_cx_total", labels())] == 0


async def test_udp_traffic_gives_exact_counter_values() -> None:
    async with udp_echo_backend("u") as (bh, bp, _):
        text = document(service_yaml("dns", [(bh, bp)], protocol="UDP"))
        async with admin_running(config(text)) as (runtime, target):
            listen = runtime.listener_for("default/dns").bound
            async with udp_client(listen) as one, udp_client(listen) as two:
                for client in (one, two, one):
                    assert await client.ask(b"q" * 10) == b"u " + b"q" * 10
            series = await scrape(target)
    route = labels(service="dns")
    assert series[("lbd_udp_sess_total", route)] == 2
    assert series[("lbd_udp_downstream_datagrams_received_total", route)] == 3
    assert series[("lbd_udp_downstream_bytes_received_total", route)] == 30
    assert series[("lbd_udp_upstream_datagrams_sent_total", route)] == 3
    assert series[("lbd_udp_upstream_bytes_received_total", route)] == 36
    assert series[("lbd_udp_downstream_datagrams_sent_total", route)] == 3
    assert series[("lbd_udp_sess_dropped_total", labels(service="dns", reason="overflow"))] == 0
    # TCP-only routes export no UDP series.
    assert not any(
        name.startswith("lbd_udp_") and ("service", "svc") in lbls for name, lbls in series
    )


async def test_health_limits_and_refusals_are_exported() -> None:
    dead_host = fresh_ip()
    text = document(
        service_yaml(
            "svc",
            [(dead_host, dead_port(dead_host))],
            extra="    healthCheck: {type: tcp, interval: 100ms, timeout: 100ms, unhealthyThreshold: 1}\n",
        )
    )
    async with admin_running(config(text)) as (runtime, target):
        route = next(iter(runtime.routes.values()))
        endpoint = route.pool.members[0]
        await until(lambda: not endpoint.healthy, what="the check to fail")
        series = await scrape(target)
    e = labels(endpoint=str(endpoint))
    assert series[("lbd_endpoint_healthy", e)] == 0
    assert series[("lbd_health_transitions_total", frozenset({("to", "unhealthy")}))] == 1
    assert series[("lbd_health_checks_total", frozenset())] >= 1
    assert series[("lbd_health_checkers_active", frozenset())] == 1
    for reason in ("overflow", "queue_timeout", "endpoint_limits", "fd_exhausted", "source_range"):
        assert series[("lbd_downstream_cx_refused_total", labels(reason=reason))] == 0
