"""Every Prometheus metric lbd exports, defined once, and how they are collected.

The data path counts in plain ints (``RouteStats``, ``EndpointStats``, ``lbd.observability.stats``);
nothing there touches prometheus-client. At scrape time ``runtime_snapshot`` reads those ints
into a ``Snapshot`` (plain, picklable data), and ``SnapshotCollector`` renders a snapshot as
metric families for prometheus-client's registry and text format.

Several worker processes (``workers: N``) are summed by the supervisor, not by prometheus-client's
multiprocess mode: each worker hands its ``Snapshot`` over (it pickles in a few KB) and the
supervisor serves ``WorkerSnapshots.total()``. Multiprocess mode would need the data path to write
through client objects into per-process mmap files (a cost per increment, a directory to clean up
when a worker is replaced, no custom collectors); a snapshot costs nothing until someone scrapes.
Each metric says how workers combine (``merge``): counters and active counts add up; per-endpoint
state (weight, health) and process facts (reloads, config hash) are the same in every worker
and take the maximum. Counters of a worker that exits are kept (``retire``), so a restart never
makes a summed counter go down.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lbd.observability.stats import (
    CONNECT_SECONDS_BUCKETS,
    CX_LENGTH_SECONDS_BUCKETS,
    NETWORK_PROGRAMMING_SECONDS_BUCKETS,
)

if TYPE_CHECKING:
    pass

Kind = Literal["counter", "gauge", "histogram"]
Merge = Literal["sum", "max"]
Labels = tuple[str, ...]
HistogramValue = tuple[list[int], float]  # per-bucket counts (last is +Inf), sum of values

ROUTE = ("namespace", "service", "port")
ENDPOINT = (*ROUTE, "endpoint")


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # as exported; a counter's ends in _total
    kind: Kind
    help: str
    labels: Labels
    merge: Merge = "sum"
    buckets: tuple[float, ...] = ()  # histograms: upper bounds, +Inf implied


def _specs(*specs: MetricSpec) -> dict[str, MetricSpec]:
    return {spec.name: spec for spec in specs}


M = MetricSpec
METRICS = _specs(
    # -- downstream: clients → lbd, per service port ------------------------------------
    M("lbd_downstream_cx_total", "counter", "Client connections accepted.", ROUTE),
    M("lbd_downstream_cx_active", "gauge", "Client connections open now.", ROUTE),
    M(
        "lbd_downstream_cx_refused_total",
        "counter",
        "Client connections reset at once, by reason (no_endpoint: none eligible; overflow: "
        "over maxConnections with the queue full; queue_timeout: waited queueTimeout; "
        "endpoint_limits: every endpoint at maxConnectionsPerEndpoint; fd_exhausted: no "
        "descriptor for the upstream socket; proxy_header_invalid: a trusted source sent no "
        "valid PROXY header; source_range: outside loadBalancerSourceRanges).",
        (*ROUTE, "reason"),
    ),
    M(
        "lbd_downstream_cx_queued_total",
        "counter",
        "Connections that waited in the queue (maxConnections reached).",
        ROUTE,
    ),
    M(
        "lbd_downstream_cx_half_closed_timeout_total",
        "counter",
        "Connections closed after halfClosedTimeout.",
        ROUTE,
    ),
    M(
        "lbd_downstream_cx_max_duration_reached_total",
        "counter",
        "Connections closed after maxConnectionDuration.",
        ROUTE,
    ),
    M(
        "lbd_listener_rebind_failures_total",
        "counter",
        "Re-binding a listener closed for lack of usable endpoints failed (retried every "
        "second), by protocol.",
        (*ROUTE, "protocol"),
    ),
    M(
        "lbd_endpoints_panic_total",
        "counter",
        "Times the service port had only unhealthy or ejected endpoints and used them all.",
        ROUTE,
    ),
    M(
        "lbd_outlier_ejections_overflow_total",
        "counter",
        "Ejections skipped because maxEjectionPercent was reached.",
        ROUTE,
    ),
    M(
        "lbd_downstream_cx_idle_timeout_total",
        "counter",
        "Connections closed after idleTimeout without bytes.",
        ROUTE,
    ),
    M(
        "lbd_affinity_entries",
        "gauge",
        "Clients remembered by sessionAffinity: ClientIP (per worker, summed).",
        ROUTE,
    ),
    M(
        "lbd_affinity_overflow_total",
        "counter",
        "Clients not remembered, or (several workers) remembered by their worker only: the "
        "affinity table or the client's shared cells were full.",
        ROUTE,
    ),
    M(
        "lbd_splice_switches_total",
        "counter",
        "Connection directions that showed bulk transfer and moved to splice(2).",
        ROUTE,
    ),
    M(
        "lbd_splice_fallbacks_total",
        "counter",
        "Bulk directions that stayed on the copy path: no pipe or descriptor for splice.",
        ROUTE,
    ),
    M(
        "lbd_splice_bytes_total",
        "counter",
        "Bytes moved by splice(2), both directions (also counted in the byte totals).",
        ROUTE,
    ),
    M("lbd_downstream_bytes_received_total", "counter", "Bytes received from clients.", ROUTE),
    M("lbd_downstream_bytes_sent_total", "counter", "Bytes sent to clients.", ROUTE),
    M(
        "lbd_downstream_cx_length_seconds",
        "histogram",
        "How long client connections lasted.",
        ROUTE,
        buckets=CX_LENGTH_SECONDS_BUCKETS,
    ),
    # -- upstream: lbd → endpoints -------------------------------------------------------------
    M("lbd_upstream_cx_retries_total", "counter", "Connect tries after the first.", ROUTE),
    M(
        "lbd_upstream_cx_connect_attempts_exceeded_total",
        "counter",
        "Client connections given up because no endpoint accepted a connect.",
        ROUTE,
    ),
    M("lbd_upstream_cx_total", "counter", "Connects started to the endpoint.", ENDPOINT),
    M(
        "lbd_upstream_cx_active",
        "gauge",
        "Connections to the endpoint open or connecting now.",
        ENDPOINT,
    ),
    M("lbd_upstream_cx_connect_fail_total", "counter", "Connects that failed.", ENDPOINT),
    M(
        "lbd_upstream_cx_connect_timeout_total",
        "counter",
        "Connects that timed out.",
        ENDPOINT,
    ),
    M("lbd_upstream_bytes_sent_total", "counter", "Bytes sent to the endpoint.", ENDPOINT),
    M(
        "lbd_upstream_bytes_received_total",
        "counter",
        "Bytes received from the endpoint.",
        ENDPOINT,
    ),
    M(
        "lbd_upstream_cx_connect_seconds",
        "histogram",
        "Time to connect to the endpoint (successful connects).",
        ENDPOINT,
        buckets=CONNECT_SECONDS_BUCKETS,
    ),
    # -- endpoint state ------------------------------------------------------------------------
    M(
        "lbd_endpoint_weight",
        "gauge",
        "Effective weight (an admin override if set).",
        ENDPOINT,
        "max",
    ),
    M(
        "lbd_endpoint_eligible",
        "gauge",
        "1 if the endpoint takes new connections.",
        ENDPOINT,
        "max",
    ),
    M(
        "lbd_endpoint_healthy",
        "gauge",
        "1 unless health checking found the endpoint unhealthy.",
        ENDPOINT,
        "max",
    ),
    M(
        "lbd_endpoint_ejections_total",
        "counter",
        "Times passive health checking ejected the endpoint.",
        ENDPOINT,
    ),
    # -- UDP: a session is one client address of one listener ------------------------------
    M("lbd_udp_sess_total", "counter", "UDP sessions started.", ROUTE),
    M("lbd_udp_sess_active", "gauge", "UDP sessions open now.", ROUTE),
    M(
        "lbd_udp_sess_dropped_total",
        "counter",
        "New UDP clients whose datagram was dropped, by reason (overflow: maxUdpSessions "
        "reached; no_endpoint; create_fail: no upstream socket; source_range: outside "
        "loadBalancerSourceRanges).",
        (*ROUTE, "reason"),
    ),
    M(
        "lbd_udp_sess_ended_total",
        "counter",
        "UDP sessions ended early, by reason (idle_timeout; endpoint_gone).",
        (*ROUTE, "reason"),
    ),
    M(
        "lbd_udp_downstream_datagrams_received_total",
        "counter",
        "Datagrams received from clients.",
        ROUTE,
    ),
    M("lbd_udp_downstream_bytes_received_total", "counter", "Bytes received from clients.", ROUTE),
    M("lbd_udp_downstream_datagrams_sent_total", "counter", "Replies sent to clients.", ROUTE),
    M("lbd_udp_upstream_datagrams_sent_total", "counter", "Datagrams sent to endpoints.", ROUTE),
    M(
        "lbd_udp_upstream_datagrams_received_total",
        "counter",
        "Datagrams received from endpoints.",
        ROUTE,
    ),
    M("lbd_udp_upstream_bytes_received_total", "counter", "Bytes received from endpoints.", ROUTE),
    M(
        "lbd_udp_errors_total",
        "counter",
        "UDP errors, handled and counted, by where they happened (downstream_rx, downstream_tx, "
        "upstream_rx, upstream_tx, upstream_icmp).",
        (*ROUTE, "where"),
    ),
    # -- process -----------------------------------------------------------------------------
    M("lbd_health_checks_total", "counter", "Active health checks run.", ()),
    M("lbd_health_check_failures_total", "counter", "Active health checks that failed.", ()),
    M(
        "lbd_health_checks_skipped_total",
        "counter",
        "Health checks lbd could not run itself (e.g. out of descriptors); never held against "
        "the endpoint.",
        (),
    ),
    M(
        "lbd_health_transitions_total",
        "counter",
        "Endpoint health changes found by active checks, by new state (healthy, unhealthy).",
        ("to",),
    ),
    M(
        "lbd_health_checkers_active",
        "gauge",
        "Endpoints being checked (one per address, port and check).",
        (),
    ),
    M(
        "lbd_dns_resolutions_total",
        "counter",
        "ExternalName resolutions, by result (success; failure: the last good answer stays).",
        ("result",),
    ),
    M(
        "lbd_health_check_node_port_requests_total",
        "counter",
        "Requests answered on healthCheckNodePort listeners.",
        (),
    ),
    M(
        "lbd_listener_bind_failures_total",
        "counter",
        "Listeners that could not be bound at start or in a reload (which then changed nothing).",
        (),
    ),
    M(
        "lbd_config_reloads_total",
        "counter",
        "Config reloads, by result (success, failure).",
        ("result",),
        "max",
    ),
    M(
        "lbd_config_last_reload_success_timestamp_seconds",
        "gauge",
        "When the running config was applied (start or reload), Unix time.",
        (),
        "max",
    ),
    M("lbd_config_info", "gauge", "The running config's hash, as a label.", ("hash",), "max"),
    M("lbd_build_info", "gauge", "lbd's version, as labels.", ("version", "python"), "max"),
    # -- Kubernetes API source (lbd run --kubernetes); one per lbd, in the supervisor ---------
    M(
        "lbd_kubernetes_watch_events_total",
        "counter",
        "Watch events received, by kind (Service, EndpointSlice, Node) and type (ADDED, "
        "MODIFIED, DELETED, BOOKMARK, ERROR).",
        ("kind", "type"),
        "max",
    ),
    M(
        "lbd_kubernetes_relists_total",
        "counter",
        "Full lists after the first, by kind (410 Gone, or a watch that could not resume).",
        ("kind",),
        "max",
    ),
    M(
        "lbd_kubernetes_errors_total",
        "counter",
        "List or watch requests that failed (unreachable, HTTP error, broken stream), by kind.",
        ("kind",),
        "max",
    ),
    M(
        "lbd_kubernetes_connected",
        "gauge",
        "1 while every watch is open; 0 from the first failure until all recover (the last "
        "state is served meanwhile).",
        (),
        "max",
    ),
    M(
        "lbd_kubernetes_last_sync_timestamp_seconds",
        "gauge",
        "When the API's state was last applied (or found unchanged), Unix time.",
        (),
        "max",
    ),
    M(
        "lbd_kubernetes_syncs_total",
        "counter",
        "Applies of the API's state, by result (applied, unchanged, failed).",
        ("result",),
        "max",
    ),
    M(
        "lbd_kubernetes_services_rejected_total",
        "counter",
        "Service updates refused (invalid field or lbd.io/ annotation, or a listener conflict); "
        "the service kept its last good form.",
        (),
        "max",
    ),
    M(
        "lbd_kubernetes_service_ips_skipped_total",
        "counter",
        "externalIPs and LoadBalancer IPs not served: outside --allowed-service-ips.",
        (),
        "max",
    ),
    M(
        "lbd_network_programming_duration_seconds",
        "histogram",
        "From an EndpointSlice change seen on the watch to its service applied (kube-proxy's "
        "network programming latency, measured from the event's arrival).",
        (),
        "max",
        buckets=NETWORK_PROGRAMMING_SECONDS_BUCKETS,
    ),
    # -- supervisor (workers: N > 1) -------------------------------------------------------
    M("lbd_workers", "gauge", "Worker processes serving now.", (), "max"),
    M(
        "lbd_worker_restarts_total",
        "counter",
        "Worker processes replaced after they exited.",
        (),
        "max",
    ),
)
del M


@dataclass(slots=True)
class Snapshot:
    """Values of every metric at one instant: plain data, picklable, mergeable."""

    values: dict[str, dict[Labels, float]] = field(default_factory=dict)
    histograms: dict[str, dict[Labels, HistogramValue]] = field(default_factory=dict)

    def add(self, name: str, labels: Labels, value: float) -> None:
        series = self.values.setdefault(name, {})
        series[labels] = series.get(labels, 0) + value

    def set_histogram(self, name: str, labels: Labels, counts: list[int], total: float) -> None:
        self.histograms.setdefault(name, {})[labels] = (list(counts), total)

    def value(self, name: str, *labels: str) -> float:
        """One series' value (0 when absent): for tests and ``lbd status``."""
        return self.values.get(name, {}).get(labels, 0)


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One snapshot for several workers, each metric combined by its ``merge`` rule."""
    total = Snapshot()
    for snap in snapshots:
        for name, series in snap.values.items():
            rule = METRICS[name].merge
            into = total.values.setdefault(name, {})
            for labels, value in series.items():
                if labels in into:
                    into[labels] = (
                        into[labels] + value if rule == "sum" else max(into[labels], value)
                    )
                else:
                    into[labels] = value
        for name, hist_series in snap.histograms.items():
            hist_into = total.histograms.setdefault(name, {})
            for labels, (counts, value_sum) in hist_series.items():
                if labels in hist_into:
                    old_counts, old_sum = hist_into[labels]
                    hist_into[labels] = (
                        [a + b for a, b in zip(old_counts, counts, strict=True)],
                        old_sum + value_sum,
                    )
                else:
                    hist_into[labels] = (list(counts), value_sum)
    return total


class WorkerSnapshots:
    """The supervisor's sum over its workers: the latest snapshot of each live worker, plus the
    counters and histograms of workers that exited (so summed counters never go down)."""

    def __init__(self) -> None:
        self.live: dict[int, Snapshot] = {}
        self.retired = Snapshot()

    def update(self, worker: int, snapshot: Snapshot) -> None:
        self.live[worker] = snapshot

    def retire(self, worker: int) -> None:
        last = self.live.pop(worker, None)
        if last is None:
            return
        kept = Snapshot(
            values={
                name: series
                for name, series in last.values.items()
                if METRICS[name].kind == "counter" and METRICS[name].merge == "sum"
            },
            histograms=last.histograms,
        )
        self.retired = merge([self.retired, kept])

    def total(self) -> Snapshot:
        return merge([self.retired, *self.live.values()])


class SnapshotCollector(Collector):
    """Renders the snapshot ``source()`` returns, at each scrape, as prometheus-client families."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not call source(): the runtime may not exist yet

    def collect(self) -> Iterator[Metric]:
        snap = self.source()
        for spec in METRICS.values():
            labels = list(spec.labels)
            if spec.kind == "histogram":
                yield _histogram(spec, snap.histograms.get(spec.name, {}))
                continue
            family: CounterMetricFamily | GaugeMetricFamily
            if spec.kind == "counter":
                family = CounterMetricFamily(spec.name, spec.help, labels=labels)
            else:
                family = GaugeMetricFamily(spec.name, spec.help, labels=labels)
            for values, value in sorted(snap.values.get(spec.name, {}).items()):
                family.add_metric(list(values), value)
            yield family


def _histogram(spec: MetricSpec, series: dict[Labels, HistogramValue]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
    bounds = [*(_le(bound) for bound in spec.buckets), "+Inf"]
    for labels, (counts, value_sum) in sorted(series.items()):
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(bounds, counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(labels), cumulative, value_sum)
    return family


def _le(bound: float) -> str:
    return repr(float(bound))
