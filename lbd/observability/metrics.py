"""Every Prometheus metric lbd exports, in one table that also names the stats field it reads.

A metric's name is ``lbd_`` + its field in ``lbd.observability.stats`` (``RouteStats``,
``EndpointStats``, ``HealthStats``, ``ProcessStats``, ``SupervisorStats``, ``NodeAddressStats``,
chosen by ``scope``),
so a name and the counter behind it cannot drift apart. A labelled metric's field is a small
object whose fields are the label's values (``Refusals`` for ``reason``...). The data path
counts in those plain ints and never touches prometheus-client; ``lbd.observability.snapshot``
reads them into a picklable ``Snapshot`` at scrape time, through this table only.

Each metric says how workers combine (``merge``): counters and active counts add up; per-endpoint
state (weight, health) and process facts (reloads, config hash) are the same in every worker
and take the maximum.
"""

from __future__ import annotations

from lbd.observability.fault_metrics import FAULT_METRICS
from lbd.observability.kubernetes_metrics import KUBERNETES_METRICS
from lbd.observability.metric_spec import SCOPE_LABELS, Kind, MetricSpec, Scope
from lbd.observability.stats import (
    CONNECT_SECONDS_BUCKETS,
    CX_LENGTH_SECONDS_BUCKETS,
)


def _route(field: str, kind: Kind, help: str, **more: object) -> MetricSpec:
    return MetricSpec(field, kind, help, "route", **more)  # type: ignore[arg-type]


def _endpoint(field: str, kind: Kind, help: str, **more: object) -> MetricSpec:
    return MetricSpec(field, kind, help, "endpoint", **more)  # type: ignore[arg-type]


def _udp(field: str, kind: Kind, help: str, **more: object) -> MetricSpec:
    return MetricSpec(field, kind, help, "route", udp_only=True, **more)  # type: ignore[arg-type]


C: Kind = "counter"
G: Kind = "gauge"
_TABLE: tuple[MetricSpec, ...] = (
    # -- downstream: clients → lbd, per service port ------------------------------------------
    _route("downstream_cx_total", C, "Client connections accepted."),
    _route("downstream_cx_active", G, "Client connections open now."),
    _route(
        "downstream_cx_refused_total",
        C,
        "Client connections reset at once, by reason (no_endpoint: none eligible; overflow: "
        "over maxConnections with the queue full; queue_timeout: waited queueTimeout; "
        "endpoint_limits: every endpoint at maxConnectionsPerEndpoint; fd_exhausted: no "
        "descriptor for it or its upstream socket; proxy_header_invalid: a trusted source sent no "
        "valid PROXY header; source_range: outside loadBalancerSourceRanges; fault: a refuse "
        "fault).",
        label="reason",
    ),
    _route(
        "downstream_cx_queued_total",
        C,
        "Connections that waited in the queue (maxConnections reached).",
    ),
    _route(
        "downstream_cx_half_closed_timeout_total", C, "Connections closed after halfClosedTimeout."
    ),
    _route(
        "downstream_cx_max_duration_reached_total",
        C,
        "Connections closed after maxConnectionDuration.",
    ),
    _route(
        "listener_rebind_failures_total",
        C,
        "Re-binding a listener closed for lack of usable endpoints failed (retried every "
        "second), by protocol.",
        label="protocol",
    ),
    _route(
        "listener_destroyed_total",
        C,
        "Listening sockets found destroyed from outside (ss -K, or an error that closed them) "
        "and bound again, by protocol.",
        label="protocol",
    ),
    _route(
        "endpoints_panic_total",
        C,
        "Times the service port had only unhealthy or ejected endpoints and used them all.",
    ),
    _route(
        "outlier_ejections_overflow_total",
        C,
        "Ejections skipped because maxEjectionPercent was reached.",
    ),
    _route(
        "downstream_cx_idle_timeout_total", C, "Connections closed after idleTimeout without bytes."
    ),
    _route(
        "affinity_entries",
        G,
        "Clients remembered by sessionAffinity: ClientIP (per worker, summed).",
    ),
    _route(
        "affinity_overflow_total",
        C,
        "Clients not remembered, or (several workers) remembered by their worker only: the "
        "affinity table or the client's shared cells were full.",
    ),
    _route(
        "splice_switches_total",
        C,
        "Connection directions that showed bulk transfer and moved to splice(2).",
    ),
    _route(
        "splice_fallbacks_total",
        C,
        "Bulk directions that stayed on the copy path: no pipe or descriptor for splice.",
    ),
    _route(
        "splice_bytes_total",
        C,
        "Bytes moved by splice(2), both directions (also counted in the byte totals).",
    ),
    _route("downstream_bytes_received_total", C, "Bytes received from clients."),
    _route("downstream_bytes_sent_total", C, "Bytes sent to clients."),
    _route(
        "downstream_cx_length_seconds",
        "histogram",
        "How long client connections lasted.",
        buckets=CX_LENGTH_SECONDS_BUCKETS,
    ),
    # -- upstream: lbd → endpoints ------------------------------------------------------------
    _route("upstream_cx_retries_total", C, "Connect tries after the first."),
    _route(
        "upstream_cx_connect_attempts_exceeded_total",
        C,
        "Client connections given up because no endpoint accepted a connect.",
    ),
    _endpoint("upstream_cx_total", C, "Connects started to the endpoint."),
    _endpoint("upstream_cx_active", G, "Connections to the endpoint open or connecting now."),
    _endpoint("upstream_cx_connect_fail_total", C, "Connects that failed."),
    _endpoint("upstream_cx_connect_timeout_total", C, "Connects that timed out."),
    _endpoint(
        "upstream_cx_closed_before_data_total",
        C,
        "Connections the endpoint closed or reset before a byte (or the client's FIN) passed "
        "(a backend that died with connections in its accept queue): the client was retried "
        "elsewhere.",
    ),
    _endpoint("upstream_bytes_sent_total", C, "Bytes sent to the endpoint."),
    _endpoint("upstream_bytes_received_total", C, "Bytes received from the endpoint."),
    _endpoint(
        "upstream_cx_connect_seconds",
        "histogram",
        "Time to connect to the endpoint (successful connects).",
        buckets=CONNECT_SECONDS_BUCKETS,
    ),
    # -- endpoint state -----------------------------------------------------------------------
    _endpoint("endpoint_weight", G, "Effective weight (an admin override if set).", merge="max"),
    _endpoint("endpoint_eligible", G, "1 if the endpoint takes new connections.", merge="max"),
    _endpoint(
        "endpoint_healthy",
        G,
        "1 unless health checking found the endpoint unhealthy.",
        merge="max",
    ),
    _endpoint("endpoint_ejections_total", C, "Times passive health checking ejected the endpoint."),
    # -- UDP: a session is one client address of one listener ---------------------------------
    _udp("udp_sess_total", C, "UDP sessions started."),
    _udp("udp_sess_active", G, "UDP sessions open now."),
    _udp(
        "udp_sess_dropped_total",
        C,
        "New UDP clients whose datagram was dropped, by reason (overflow: maxUdpSessions "
        "reached; no_endpoint; create_fail: no upstream socket; source_range: outside "
        "loadBalancerSourceRanges; rate: its address over udpSessionRate).",
        label="reason",
    ),
    _udp(
        "udp_sess_ended_total",
        C,
        "UDP sessions ended early, by reason (idle_timeout; endpoint_gone; replied: got the "
        "replies it expected).",
        label="reason",
    ),
    _udp("udp_downstream_datagrams_received_total", C, "Datagrams received from clients."),
    _udp("udp_downstream_bytes_received_total", C, "Bytes received from clients."),
    _udp("udp_downstream_datagrams_sent_total", C, "Replies sent to clients."),
    _udp("udp_upstream_datagrams_sent_total", C, "Datagrams sent to endpoints."),
    _udp("udp_upstream_datagrams_received_total", C, "Datagrams received from endpoints."),
    _udp("udp_upstream_bytes_received_total", C, "Bytes received from endpoints."),
    _udp(
        "udp_replies_capped_total",
        C,
        "Replies from endpoints dropped: more than the client's datagrams allow (udpResponses).",
    ),
    _udp(
        "udp_errors_total",
        C,
        "UDP errors, handled and counted, by where they happened (downstream_rx, downstream_tx, "
        "upstream_rx, upstream_tx, upstream_icmp).",
        label="where",
    ),
    # -- health checks ------------------------------------------------------------------------
    MetricSpec("health_checks_total", C, "Active health checks run.", "health"),
    MetricSpec("health_check_failures_total", C, "Active health checks that failed.", "health"),
    MetricSpec(
        "health_checks_skipped_total",
        C,
        "Health checks lbd could not run itself (e.g. out of descriptors); never held against "
        "the endpoint.",
        "health",
    ),
    MetricSpec(
        "health_transitions_total",
        C,
        "Endpoint health changes found by active checks, by new state (healthy, unhealthy).",
        "health",
        label="to",
    ),
    MetricSpec(
        "health_checkers_active",
        G,
        "Endpoints being checked (one per address, port and check).",
        "health",
    ),
    # -- process ------------------------------------------------------------------------------
    MetricSpec(
        "dns_resolutions_total",
        C,
        "ExternalName resolutions, by result (success; failure: the last good answer stays).",
        "process",
        label="result",
    ),
    MetricSpec(
        "health_check_node_port_requests_total",
        C,
        "Requests answered on healthCheckNodePort listeners.",
        "process",
    ),
    MetricSpec(
        "listener_bind_failures_total",
        C,
        "Listeners that could not be bound at start or in a reload (which then changed nothing).",
        "process",
    ),
    MetricSpec(
        "config_reloads_total",
        C,
        "Config reloads, by result (success, failure).",
        "process",
        label="result",
        merge="max",
    ),
    MetricSpec(
        "config_last_reload_success_timestamp_seconds",
        G,
        "When the running config was applied (start or reload), Unix time.",
        "process",
        merge="max",
    ),
    MetricSpec(
        "config_info",
        "info",
        "The running config's hash, as a label.",
        "process",
        merge="max",
        info=("hash",),
    ),
    MetricSpec(
        "build_info",
        "info",
        "lbd's version, as labels.",
        "process",
        merge="max",
        info=("version", "python"),
    ),
    # -- node (node.manageAddresses) ----------------------------------------------------------
    MetricSpec(
        "node_address_changes_total",
        C,
        "Service addresses lbd put on the node or took off (node.manageAddresses), by change "
        "(added, removed, restored: put back after something else removed it).",
        "node",
        label="change",
    ),
    MetricSpec(
        "node_address_errors_total",
        C,
        "Netlink requests for the node's service addresses that failed.",
        "node",
    ),
    *KUBERNETES_METRICS,
    *FAULT_METRICS,
    # -- supervisor (workers: N > 1) ----------------------------------------------------------
    MetricSpec("workers", G, "Worker processes serving now.", "supervisor", merge="max"),
    MetricSpec(
        "worker_restarts_total",
        C,
        "Worker processes replaced after they exited.",
        "supervisor",
        merge="max",
    ),
)
del C, G
METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _TABLE}
BY_SCOPE: dict[Scope, tuple[MetricSpec, ...]] = {
    scope: tuple(spec for spec in _TABLE if spec.scope == scope) for scope in SCOPE_LABELS
}
