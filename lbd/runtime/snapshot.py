"""Read a worker's live counters into a metrics ``Snapshot`` (at scrape time only).

The stats objects are read through the metric table (``read_stats``); the few values their
owners keep elsewhere (the pool's panics, an endpoint's weight and state, the affinity table's
size) are copied into their "at scrape" fields first. Bytes of open connections are added to
those of closed ones, so byte counters move while long connections run and stay monotonic (a
connection's bytes move from the one to the other when it closes).
"""

from __future__ import annotations

from collections.abc import Iterable

from lbd.endpoints.endpoint import UpstreamEndpoint, ineligible_reason
from lbd.endpoints.route import Route
from lbd.net.tcp_proxy import Downstream
from lbd.observability.metrics import METRICS
from lbd.observability.snapshot import Snapshot, read_stats
from lbd.observability.stats import HealthStats, KubernetesStats, ProcessStats

_OPEN_BYTES = (
    # (route metric, endpoint metric, Downstream attribute)
    ("lbd_downstream_bytes_received_total", "lbd_upstream_bytes_sent_total", "received"),
    ("lbd_downstream_bytes_sent_total", "lbd_upstream_bytes_received_total", "sent"),
)
assert all(name in METRICS for names in _OPEN_BYTES for name in names[:2])


def runtime_snapshot(
    routes: Iterable[Route],
    connections: Iterable[Downstream],
    process: ProcessStats,
    health: HealthStats | None = None,
) -> Snapshot:
    snap = Snapshot()
    for route in routes:
        labels = (route.namespace, route.service, route.port_name)
        read_stats(snap, "route", _route_stats(route), labels, udp=route.protocol == "UDP")
        for endpoint in (*route.pool.members, *route.pool.draining):
            read_stats(snap, "endpoint", _endpoint_stats(endpoint), (*labels, str(endpoint)))
        for fault in route.fault_book.faults:
            read_stats(snap, "fault", fault.stats, (*labels, fault.id, fault.spec.type))
    for connection in connections:
        route = connection.route
        labels = (route.namespace, route.service, route.port_name)
        upstream = connection.endpoint
        for route_metric, endpoint_metric, attribute in _OPEN_BYTES:
            count = getattr(connection, attribute)
            snap.add(route_metric, labels, count)
            if upstream is not None:
                snap.add(endpoint_metric, (*labels, str(upstream)), count)
    if health is not None:
        read_stats(snap, "health", health, ())
    read_stats(snap, "process", process, ())
    return snap


def _route_stats(route: Route) -> object:
    stats = route.stats
    stats.endpoints_panic_total = route.pool.panics
    outlier = route.outlier
    stats.outlier_ejections_overflow_total = outlier.ejections_overflow_total if outlier else 0
    affinity = route.affinity
    stats.affinity_entries = len(affinity) if affinity is not None else 0
    stats.affinity_overflow_total = stats.affinity_overflow_retired + (
        affinity.overflow if affinity is not None else 0
    )
    return stats


def _endpoint_stats(endpoint: UpstreamEndpoint) -> object:
    stats = endpoint.stats
    stats.upstream_cx_active = endpoint.active_here  # workers: summed
    stats.endpoint_weight = endpoint.weight
    stats.endpoint_eligible = 1 if ineligible_reason(endpoint) is None else 0
    stats.endpoint_healthy = 1 if endpoint.healthy else 0
    return stats


def kubernetes_snapshot(snap: Snapshot, stats: KubernetesStats) -> None:
    """The Kubernetes API source's metrics (``lbd run --kubernetes``), into ``snap``."""
    read_stats(snap, "kubernetes", stats, ())
    for kind, kind_stats in stats.kinds.items():
        read_stats(snap, "kubernetes_kind", kind_stats, (kind,))
