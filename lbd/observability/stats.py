"""Plain-int counters the data path writes; ``metrics`` reads them at scrape time.

The data path never calls a Prometheus client object: an ``+= 1`` on a slot is the whole cost
of counting, and histograms are a ``bisect`` into a fixed list of bucket counts, once per
connection (never per chunk of bytes). Everything here is written by one event loop only.

Each field is named after the metric it becomes (``lbd_`` + field name; a counter's ends in
``_total``), and a field whose metric has a label is a small object with one field per label
value (``Refusals``...): ``lbd.observability.metrics.METRICS`` names the field, so the two
cannot drift. Fields marked "at scrape" are set from their owners when a snapshot is taken.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

# Upper bounds in seconds (Prometheus ``le``), +Inf implied. Connect times on one host are
# sub-millisecond; across a network a few ms; timeouts show up in the top buckets.
CONNECT_SECONDS_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0
)  # fmt: skip
# Connections live from milliseconds (one request) to hours (databases, streams).
CX_LENGTH_SECONDS_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0
)  # fmt: skip


class Buckets:
    """A histogram as plain ints: ``counts[i]`` observations fell in bucket i (not cumulative;
    the last slot is +Inf). ``metrics`` makes them cumulative when it renders them."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0  # the sum of observed values

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


# -- labelled families: one field per label value -----------------------------------------------


@dataclass(slots=True)
class Refusals:
    """Client connections reset instead of served, by ``reason``."""

    no_endpoint: int = 0  # none eligible (in the moment before the listener closes)
    overflow: int = 0  # over maxConnections with the queue full
    queue_timeout: int = 0  # waited queueTimeout in the queue
    endpoint_limits: int = 0  # admitted, then every endpoint was at maxConnectionsPerEndpoint
    fd_exhausted: int = 0  # no descriptor left for it (at accept) or its upstream socket
    proxy_header_invalid: int = 0  # a trusted source sent no valid PROXY header
    source_range: int = 0  # outside loadBalancerSourceRanges
    fault: int = 0  # a refuse fault (docs/faults.md)


@dataclass(slots=True)
class ByProtocol:
    TCP: int = 0  # the label values are the protocols' names
    UDP: int = 0


@dataclass(slots=True)
class UdpDrops:
    """New UDP clients whose datagram was dropped instead of starting a session, by ``reason``."""

    overflow: int = 0  # maxUdpSessions reached
    no_endpoint: int = 0
    create_fail: int = 0  # no upstream socket (out of ports or descriptors)
    source_range: int = 0  # outside loadBalancerSourceRanges
    rate: int = 0  # over udpSessionRate: its address starts sessions too fast


@dataclass(slots=True)
class UdpEnds:
    """UDP sessions ended early, by ``reason``."""

    idle_timeout: int = 0
    endpoint_gone: int = 0  # its endpoint left the eligible set
    replied: int = 0  # it got the replies it expected (nginx's proxy_responses)


@dataclass(slots=True)
class UdpErrors:
    """Handled UDP errors, by ``where`` they happened."""

    downstream_rx: int = 0
    downstream_tx: int = 0  # replies dropped: client send buffer full or error
    upstream_rx: int = 0
    upstream_tx: int = 0  # datagrams dropped towards an endpoint
    upstream_icmp: int = 0  # the endpoint answered with an ICMP error (refused...)


@dataclass(slots=True)
class Results:
    success: int = 0
    failure: int = 0


@dataclass(slots=True)
class Transitions:
    healthy: int = 0
    unhealthy: int = 0


# -- per scope ----------------------------------------------------------------------------------


@dataclass(slots=True)
class RouteStats:
    """Counters of one service port; the single writer is the worker's event loop. Per-endpoint
    counters live on each ``UpstreamEndpoint.stats``."""

    downstream_cx_total: int = 0
    downstream_cx_active: int = 0
    downstream_cx_refused_total: Refusals = field(default_factory=Refusals)
    downstream_cx_queued_total: int = 0  # connections that had to wait in the queue
    downstream_cx_half_closed_timeout_total: int = 0
    downstream_cx_max_duration_reached_total: int = 0
    downstream_cx_idle_timeout_total: int = 0
    # Of closed connections; open ones add theirs at scrape.
    downstream_bytes_received_total: int = 0
    downstream_bytes_sent_total: int = 0
    downstream_cx_length_seconds: Buckets = field(
        default_factory=lambda: Buckets(CX_LENGTH_SECONDS_BUCKETS)
    )
    listener_rebind_failures_total: ByProtocol = field(default_factory=ByProtocol)
    listener_destroyed_total: ByProtocol = field(default_factory=ByProtocol)
    upstream_cx_retries_total: int = 0
    upstream_cx_connect_attempts_exceeded_total: int = 0  # no endpoint accepted a connect
    endpoints_panic_total: int = 0  # at scrape, from the pool
    outlier_ejections_overflow_total: int = 0  # at scrape, from outlier detection
    affinity_entries: int = 0  # at scrape
    affinity_overflow_total: int = 0  # at scrape: this plus the live table's
    affinity_overflow_retired: int = 0  # of affinity tables a reload switched off
    splice_switches_total: int = 0  # directions that went bulk and moved to splice(2)
    splice_fallbacks_total: int = 0  # went bulk, but no pipe or descriptor for splice
    splice_bytes_total: int = 0  # moved by splice (also in the per-direction byte counters)
    # UDP (names after Envoy's UDP proxy: a "session" is one client address of one listener)
    udp_sess_total: int = 0
    udp_sess_active: int = 0
    udp_sess_dropped_total: UdpDrops = field(default_factory=UdpDrops)
    udp_sess_ended_total: UdpEnds = field(default_factory=UdpEnds)
    udp_downstream_datagrams_received_total: int = 0
    udp_downstream_bytes_received_total: int = 0
    udp_downstream_datagrams_sent_total: int = 0
    udp_upstream_datagrams_sent_total: int = 0
    udp_upstream_datagrams_received_total: int = 0
    udp_upstream_bytes_received_total: int = 0
    udp_replies_capped_total: int = 0  # replies beyond what udpResponses allows: dropped
    udp_errors_total: UdpErrors = field(default_factory=UdpErrors)
    # mirror: (lbd.net.mirror); the real connection never waits for its copy
    mirror_cx_total: int = 0
    mirror_cx_failed_total: int = 0  # the shadow refused, failed or fell behind: copy ended
    mirror_bytes_sent_total: int = 0
    mirror_bytes_dropped_total: int = 0  # not copied: the shadow's buffer was full or it failed


@dataclass(slots=True)
class FaultStats:
    """Counters of one fault of one service port (docs/faults.md)."""

    fault_applied_total: int = 0  # connections (TCP) or datagrams (UDP) it acted on
    fault_bytes_delayed_total: int = 0  # held back: latency, bandwidth, slicer, delay, reorder
    fault_bytes_discarded_total: int = 0  # never delivered: timeout, limit_data, drop
    fault_cx_cut_total: int = 0  # connections it ended: refuse, limit_data, timeout, reset_peer


@dataclass(slots=True)
class FaultChanges:
    added: int = 0
    removed: int = 0


@dataclass(slots=True)
class EndpointStats:
    """Counters of one endpoint of one service port (the upstream side)."""

    upstream_cx_total: int = 0
    upstream_cx_active: int = 0  # at scrape: this worker's connections
    upstream_cx_connect_fail_total: int = 0
    upstream_cx_connect_timeout_total: int = 0
    upstream_cx_closed_before_data_total: int = 0  # closed or reset before a byte: retried
    # lbd → endpoint and back, of closed connections (open ones add theirs at scrape)
    upstream_bytes_sent_total: int = 0
    upstream_bytes_received_total: int = 0
    upstream_cx_connect_seconds: Buckets = field(
        default_factory=lambda: Buckets(CONNECT_SECONDS_BUCKETS)
    )
    endpoint_weight: float = 0.0  # at scrape
    endpoint_eligible: int = 0  # at scrape
    endpoint_healthy: int = 0  # at scrape
    endpoint_ejections_total: int = 0  # by outlier detection, in the worker that decided it


@dataclass(slots=True)
class HealthStats:
    """Counters of every active health checker of one lbd process."""

    health_checks_total: int = 0
    health_check_failures_total: int = 0
    health_checks_skipped_total: int = 0  # lbd could not run the probe (out of descriptors)
    health_transitions_total: Transitions = field(default_factory=Transitions)
    health_checkers_active: int = 0


@dataclass(slots=True)
class ProcessStats:
    """Process-wide facts: reloads, when the current config was applied, what runs."""

    started: float = field(default_factory=time.time)
    config_reloads_total: Results = field(default_factory=Results)
    config_last_reload_success_timestamp_seconds: float = 0.0  # start counts as a reload
    last_reload_failed_time: float = 0.0
    reloads_unchanged: int = 0  # the file was read again but its bytes had not changed
    listener_bind_failures_total: int = 0  # at start or in a reload's prepare phase
    dns_resolutions_total: Results = field(default_factory=Results)  # ExternalName answers
    health_check_node_port_requests_total: int = 0
    fault_changes_total: FaultChanges = field(default_factory=FaultChanges)  # admin API
    config_info: tuple[str, ...] = ("",)  # the running config's hash
    build_info: tuple[str, ...] = ("", "")  # lbd's version, Python's

    def __post_init__(self) -> None:
        if not self.config_last_reload_success_timestamp_seconds:
            self.config_last_reload_success_timestamp_seconds = self.started

    def reload_succeeded(self) -> None:
        self.config_reloads_total.success += 1
        self.config_last_reload_success_timestamp_seconds = time.time()

    def reload_failed(self) -> None:
        self.config_reloads_total.failure += 1
        self.last_reload_failed_time = time.time()


@dataclass(slots=True)
class AddressChanges:
    added: int = 0
    removed: int = 0
    restored: int = 0  # put back after something other than lbd removed it


@dataclass(slots=True)
class NodeAddressStats:
    """node.manageAddresses (``lbd.net.addresses``): kept by the one process that manages the
    node's service addresses (the only worker, or the supervisor)."""

    node_address_changes_total: AddressChanges = field(default_factory=AddressChanges)
    node_address_errors_total: int = 0  # netlink requests that failed


@dataclass(slots=True)
class SupervisorStats:
    """What only a supervisor of several workers knows."""

    workers: int = 0
    worker_restarts_total: int = 0


# -- the Kubernetes API source (lbd run --kubernetes) -------------------------------------------

# kube-proxy's network programming latency is usually well under a second, but bounded
# frequency (minSyncPeriod) and large applies push it to seconds.
NETWORK_PROGRAMMING_SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip


@dataclass(slots=True)
class WatchEvents:
    """Watch events of one kind, by ``type``."""

    ADDED: int = 0
    MODIFIED: int = 0
    DELETED: int = 0
    BOOKMARK: int = 0
    ERROR: int = 0


@dataclass(slots=True)
class Syncs:
    """Applies of the API's state, by ``result``."""

    applied: int = 0
    unchanged: int = 0
    failed: int = 0


@dataclass(slots=True)
class KubernetesKindStats:
    """One watched kind (Service, EndpointSlice, Node): the ``kind`` label."""

    kubernetes_watch_events_total: WatchEvents = field(default_factory=WatchEvents)
    kubernetes_relists_total: int = 0  # lists after the first (410 Gone)
    kubernetes_errors_total: int = 0  # failed requests or broken streams


@dataclass(slots=True)
class KubernetesStats:
    """The Kubernetes API source; written by its event loop only.

    ``connected``, ``synced`` and ``last_sync_time`` are what health and readiness read: the
    state being served is as old as ``last_sync_time`` while ``connected`` is False."""

    kubernetes_connected: int = 0  # 1 while every watch is open
    kubernetes_last_sync_timestamp_seconds: float = 0.0  # the last apply (or no-op) of the API
    kubernetes_syncs_total: Syncs = field(default_factory=Syncs)
    kubernetes_services_rejected_total: int = 0  # invalid update: the last good form stays
    kubernetes_service_ips_skipped_total: int = 0  # outside --allowed-service-ips
    network_programming_duration_seconds: Buckets = field(
        default_factory=lambda: Buckets(NETWORK_PROGRAMMING_SECONDS_BUCKETS)
    )
    synced: bool = False  # the first full list of every kind was applied (readiness)
    kinds: dict[str, KubernetesKindStats] = field(default_factory=dict)  # not a metric itself

    @property
    def connected(self) -> bool:
        return bool(self.kubernetes_connected)

    @property
    def last_sync_time(self) -> float:
        """Wall clock of the last apply of the API's state; 0 before the first."""
        return self.kubernetes_last_sync_timestamp_seconds

    def kind(self, name: str) -> KubernetesKindStats:
        found = self.kinds.get(name)
        if found is None:
            found = self.kinds[name] = KubernetesKindStats()
        return found
