"""The metrics of the Kubernetes API source (``lbd run --kubernetes``): one set per lbd, kept by
the process that watches (the supervisor, with workers). Part of ``lbd.observability.metrics``'s
table; here only so that each file reads in one sitting."""

from __future__ import annotations

from lbd.observability.metric_spec import Kind, MetricSpec
from lbd.observability.stats import NETWORK_PROGRAMMING_SECONDS_BUCKETS

C: Kind = "counter"
G: Kind = "gauge"
KUBERNETES_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "kubernetes_watch_events_total",
        C,
        "Watch events received, by kind (Service, EndpointSlice, Node) and type (ADDED, "
        "MODIFIED, DELETED, BOOKMARK, ERROR).",
        "kubernetes_kind",
        label="type",
        merge="max",
    ),
    MetricSpec(
        "kubernetes_relists_total",
        C,
        "Full lists after the first, by kind (410 Gone: the watch could not resume).",
        "kubernetes_kind",
        merge="max",
    ),
    MetricSpec(
        "kubernetes_errors_total",
        C,
        "List or watch requests that failed (unreachable, HTTP error, broken stream), by kind.",
        "kubernetes_kind",
        merge="max",
    ),
    MetricSpec(
        "kubernetes_connected",
        G,
        "1 while every watch is open; 0 from the first failure until all recover (the last "
        "state is served meanwhile).",
        "kubernetes",
        merge="max",
    ),
    MetricSpec(
        "kubernetes_last_sync_timestamp_seconds",
        G,
        "When the API's state was last applied (or found unchanged), Unix time.",
        "kubernetes",
        merge="max",
    ),
    MetricSpec(
        "kubernetes_syncs_total",
        C,
        "Applies of the API's state, by result (applied, unchanged, failed).",
        "kubernetes",
        label="result",
        merge="max",
    ),
    MetricSpec(
        "kubernetes_services_rejected_total",
        C,
        "Service updates refused (an invalid field or lbd.io/ annotation, a listener conflict); "
        "the service kept its last good form.",
        "kubernetes",
        merge="max",
    ),
    MetricSpec(
        "kubernetes_service_ips_skipped_total",
        C,
        "externalIPs and LoadBalancer IPs not served: outside --allowed-service-ips.",
        "kubernetes",
        merge="max",
    ),
    MetricSpec(
        "network_programming_duration_seconds",
        "histogram",
        "From an EndpointSlice change seen on the watch to its service applied (kube-proxy's "
        "network programming latency, measured from the event's arrival).",
        "kubernetes",
        merge="max",
        buckets=NETWORK_PROGRAMMING_SECONDS_BUCKETS,
    ),
)
