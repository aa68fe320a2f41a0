"""Read a worker's live counters into a metrics ``Snapshot`` (at scrape time only)."""

from __future__ import annotations

import platform
from collections.abc import Iterable

from lbd.endpoints.endpoint import ineligible_reason
from lbd.endpoints.route import Route
from lbd.health.registry import HealthStats
from lbd.net.tcp_proxy import Downstream
from lbd.observability.metrics import Labels, Snapshot
from lbd.observability.stats import KubernetesStats, ProcessStats, RouteStats


def runtime_snapshot(
    routes: Iterable[Route],
    connections: Iterable[Downstream],
    process: ProcessStats,
    config_hash: str,
    version: str,
    health: HealthStats | None = None,
) -> Snapshot:
    """Read the data path's counters. Bytes of open connections are added to those of closed
    ones, so byte counters move while long connections run (and stay monotonic: a connection's
    bytes move from the one to the other when it closes)."""
    snap = Snapshot()
    for route in routes:
        _route_values(snap, route)
    for connection in connections:
        route = connection.route
        labels = (route.namespace, route.service, route.port_name)
        snap.add("lbd_downstream_bytes_received_total", labels, connection.received)
        snap.add("lbd_downstream_bytes_sent_total", labels, connection.sent)
        if connection.endpoint is not None:
            endpoint_labels = (*labels, str(connection.endpoint))
            snap.add("lbd_upstream_bytes_sent_total", endpoint_labels, connection.received)
            snap.add("lbd_upstream_bytes_received_total", endpoint_labels, connection.sent)
    if health is not None:
        snap.add("lbd_health_checks_total", (), health.checks_total)
        snap.add("lbd_health_check_failures_total", (), health.check_failures_total)
        snap.add("lbd_health_checks_skipped_total", (), health.checks_skipped_total)
        snap.add("lbd_health_transitions_total", ("healthy",), health.transitions_healthy_total)
        snap.add("lbd_health_transitions_total", ("unhealthy",), health.transitions_unhealthy_total)
        snap.add("lbd_health_checkers_active", (), health.checkers_active)
    snap.add("lbd_dns_resolutions_total", ("success",), process.dns_resolutions_ok)
    snap.add("lbd_dns_resolutions_total", ("failure",), process.dns_resolutions_failed)
    snap.add("lbd_health_check_node_port_requests_total", (), process.health_check_requests)
    snap.add("lbd_listener_bind_failures_total", (), process.listener_bind_failures)
    snap.add("lbd_config_reloads_total", ("success",), process.reloads_ok)
    snap.add("lbd_config_reloads_total", ("failure",), process.reloads_failed)
    snap.add("lbd_config_last_reload_success_timestamp_seconds", (), process.last_reload_ok_time)
    snap.add("lbd_config_info", (config_hash,), 1)
    snap.add("lbd_build_info", (version, platform.python_version()), 1)
    return snap


def _route_values(snap: Snapshot, route: Route) -> None:
    labels = (route.namespace, route.service, route.port_name)
    stats = route.stats
    add = snap.add
    add("lbd_downstream_cx_total", labels, stats.downstream_cx_total)
    add("lbd_downstream_cx_active", labels, stats.downstream_cx_active)
    for reason, value in stats.refusals().items():
        add("lbd_downstream_cx_refused_total", (*labels, reason), value)
    add("lbd_downstream_cx_queued_total", labels, stats.downstream_cx_queued)
    add("lbd_downstream_cx_half_closed_timeout_total", labels, stats.half_closed_timeouts)
    add("lbd_downstream_cx_max_duration_reached_total", labels, stats.max_duration_timeouts)
    add("lbd_endpoints_panic_total", labels, route.pool.panics)
    add("lbd_listener_rebind_failures_total", (*labels, "TCP"), stats.tcp_listener_bind_fail)
    add("lbd_listener_rebind_failures_total", (*labels, "UDP"), stats.udp_listener_bind_fail)
    outlier = route.outlier
    add(
        "lbd_outlier_ejections_overflow_total",
        labels,
        outlier.ejections_overflow_total if outlier is not None else 0,
    )
    add("lbd_downstream_cx_idle_timeout_total", labels, stats.idle_timeouts)
    affinity = route.affinity
    add("lbd_affinity_entries", labels, len(affinity) if affinity is not None else 0)
    overflow = stats.affinity_overflow + (affinity.overflow if affinity is not None else 0)
    add("lbd_affinity_overflow_total", labels, overflow)
    add("lbd_splice_switches_total", labels, stats.splice_switches)
    add("lbd_splice_fallbacks_total", labels, stats.splice_fallbacks)
    add("lbd_splice_bytes_total", labels, stats.splice_bytes)
    add("lbd_downstream_bytes_received_total", labels, stats.downstream_bytes_received)
    add("lbd_downstream_bytes_sent_total", labels, stats.upstream_bytes_received)
    length = stats.cx_length_seconds
    snap.set_histogram("lbd_downstream_cx_length_seconds", labels, length.counts, length.total)
    add("lbd_upstream_cx_retries_total", labels, stats.upstream_cx_retries)
    add(
        "lbd_upstream_cx_connect_attempts_exceeded_total",
        labels,
        stats.upstream_cx_none_succeeded,
    )
    if route.protocol == "UDP":
        _udp_values(snap, labels, stats)
    for endpoint in (*route.pool.members, *route.pool.draining):
        e = (*labels, str(endpoint))
        es = endpoint.stats
        add("lbd_upstream_cx_total", e, es.cx_total)
        add("lbd_upstream_cx_active", e, endpoint.active_here)  # workers: summed
        add("lbd_upstream_cx_connect_fail_total", e, es.connect_fail)
        add("lbd_upstream_cx_connect_timeout_total", e, es.connect_timeout)
        add("lbd_upstream_bytes_sent_total", e, es.bytes_sent)
        add("lbd_upstream_bytes_received_total", e, es.bytes_received)
        connect = es.connect_seconds
        snap.set_histogram("lbd_upstream_cx_connect_seconds", e, connect.counts, connect.total)
        add("lbd_endpoint_weight", e, endpoint.weight)
        add("lbd_endpoint_eligible", e, 1 if ineligible_reason(endpoint) is None else 0)
        add("lbd_endpoint_healthy", e, 1 if endpoint.healthy else 0)
        add("lbd_endpoint_ejections_total", e, es.ejections)


def _udp_values(snap: Snapshot, labels: Labels, stats: RouteStats) -> None:
    add = snap.add
    add("lbd_udp_sess_total", labels, stats.udp_sess_total)
    add("lbd_udp_sess_active", labels, stats.udp_sess_active)
    for reason, value in stats.udp_drops().items():
        add("lbd_udp_sess_dropped_total", (*labels, reason), value)
    add("lbd_udp_sess_ended_total", (*labels, "idle_timeout"), stats.udp_sess_idle_timeout)
    add("lbd_udp_sess_ended_total", (*labels, "endpoint_gone"), stats.udp_sess_endpoint_gone)
    add("lbd_udp_downstream_datagrams_received_total", labels, stats.udp_downstream_rx_datagrams)
    add("lbd_udp_downstream_bytes_received_total", labels, stats.udp_downstream_rx_bytes)
    add("lbd_udp_downstream_datagrams_sent_total", labels, stats.udp_downstream_tx_datagrams)
    add("lbd_udp_upstream_datagrams_sent_total", labels, stats.udp_upstream_tx_datagrams)
    add("lbd_udp_upstream_datagrams_received_total", labels, stats.udp_upstream_rx_datagrams)
    add("lbd_udp_upstream_bytes_received_total", labels, stats.udp_upstream_rx_bytes)
    for where, value in (
        ("downstream_rx", stats.udp_downstream_rx_errors),
        ("downstream_tx", stats.udp_downstream_tx_errors),
        ("upstream_rx", stats.udp_upstream_rx_errors),
        ("upstream_tx", stats.udp_upstream_tx_errors),
        ("upstream_icmp", stats.udp_upstream_icmp_errors),
    ):
        add("lbd_udp_errors_total", (*labels, where), value)


def kubernetes_values(snap: Snapshot, stats: KubernetesStats) -> None:
    """The Kubernetes API source's counters (``lbd run --kubernetes``)."""
    for (kind, kind_type), value in stats.events.items():
        snap.add("lbd_kubernetes_watch_events_total", (kind, kind_type), value)
    for kind, value in stats.relists.items():
        snap.add("lbd_kubernetes_relists_total", (kind,), value)
    for kind, value in stats.errors.items():
        snap.add("lbd_kubernetes_errors_total", (kind,), value)
    for result, value in stats.syncs.items():
        snap.add("lbd_kubernetes_syncs_total", (result,), value)
    snap.add("lbd_kubernetes_connected", (), 1 if stats.connected else 0)
    snap.add("lbd_kubernetes_last_sync_timestamp_seconds", (), stats.last_sync_time)
    snap.add("lbd_kubernetes_services_rejected_total", (), stats.services_rejected)
    snap.add("lbd_kubernetes_service_ips_skipped_total", (), stats.service_ips_skipped)
    latency = stats.network_programming_seconds
    snap.set_histogram(
        "lbd_network_programming_duration_seconds", (), latency.counts, latency.total
    )
