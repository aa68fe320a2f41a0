"""Plain-int counters the data path writes; ``metrics`` reads them at scrape time.

The data path never calls a Prometheus client object: an ``+= 1`` on a slot is the whole cost
of counting, and histograms are a ``bisect`` into a fixed list of bucket counts, once per
connection (never per chunk of bytes). Everything here is written by one event loop only.
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


@dataclass(slots=True)
class EndpointStats:
    """Counters of one endpoint of one service port (the upstream side)."""

    cx_total: int = 0
    connect_fail: int = 0
    connect_timeout: int = 0
    bytes_sent: int = 0  # lbd → endpoint, of closed connections (open ones add theirs at scrape)
    bytes_received: int = 0  # endpoint → lbd, likewise
    ejections: int = 0  # by outlier detection, in the worker that decided the ejection
    connect_seconds: Buckets = field(default_factory=lambda: Buckets(CONNECT_SECONDS_BUCKETS))


@dataclass(slots=True)
class ProcessStats:
    """Process-wide facts: reloads and when the current config was applied."""

    started: float = field(default_factory=time.time)
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload_ok_time: float = 0.0  # wall clock of the last successful apply (start counts)
    last_reload_failed_time: float = 0.0
    reloads_unchanged: int = 0  # the file was read again but its bytes had not changed
    listener_bind_failures: int = 0  # at start or in a reload's prepare phase
    dns_resolutions_ok: int = 0  # ExternalName answers applied
    dns_resolutions_failed: int = 0  # failed or empty: the last good answer stays
    health_check_requests: int = 0  # healthCheckNodePort requests answered

    def __post_init__(self) -> None:
        self.last_reload_ok_time = self.last_reload_ok_time or self.started

    def reload_succeeded(self) -> None:
        self.reloads_ok += 1
        self.last_reload_ok_time = time.time()

    def reload_failed(self) -> None:
        self.reloads_failed += 1
        self.last_reload_failed_time = time.time()


@dataclass(slots=True)
class RouteStats:
    """Counters of one route; the single writer is the worker's event loop. Per-endpoint
    counters live on each ``UpstreamEndpoint.stats``; ``lbd.observability.metrics`` exports
    both at scrape time."""

    downstream_cx_total: int = 0
    downstream_cx_active: int = 0
    downstream_cx_refused_no_endpoint: int = 0
    downstream_cx_refused_source_range: int = 0  # loadBalancerSourceRanges (reset per client)
    tcp_listener_bind_fail: int = 0  # re-listening when endpoints came back failed
    upstream_cx_total: int = 0
    upstream_cx_connect_fail: int = 0
    upstream_cx_connect_timeout: int = 0
    upstream_cx_retries: int = 0
    upstream_cx_none_succeeded: int = 0
    downstream_bytes_received: int = 0  # of closed connections; open ones add theirs at scrape
    upstream_bytes_received: int = 0  # = bytes sent to clients
    idle_timeouts: int = 0
    # UDP (names after Envoy's UDP proxy: a "session" is one client address of one listener)
    udp_sess_total: int = 0
    udp_sess_active: int = 0
    udp_sess_overflow: int = 0  # a new client beyond maxUdpSessions: its datagram dropped
    udp_sess_no_endpoint: int = 0  # a new client while no endpoint was eligible
    udp_sess_source_range: int = 0  # a client outside loadBalancerSourceRanges: dropped
    udp_sess_create_fail: int = 0  # no upstream socket (out of ports or descriptors)
    udp_sess_idle_timeout: int = 0
    udp_sess_endpoint_gone: int = 0  # ended because its endpoint left the eligible set
    udp_downstream_rx_datagrams: int = 0
    udp_downstream_rx_bytes: int = 0
    udp_downstream_rx_errors: int = 0
    udp_downstream_tx_datagrams: int = 0
    udp_downstream_tx_errors: int = 0  # replies dropped: client send buffer full or error
    udp_upstream_tx_datagrams: int = 0
    udp_upstream_tx_errors: int = 0  # datagrams dropped towards an endpoint
    udp_upstream_rx_datagrams: int = 0
    udp_upstream_rx_bytes: int = 0
    udp_upstream_rx_errors: int = 0
    udp_upstream_icmp_errors: int = 0  # the endpoint answered with an ICMP error (refused...)
    udp_listener_bind_fail: int = 0  # re-binding a listener when endpoints came back failed
    cx_length_seconds: Buckets = field(default_factory=lambda: Buckets(CX_LENGTH_SECONDS_BUCKETS))
    half_closed_timeouts: int = 0
    max_duration_timeouts: int = 0
    downstream_cx_queued: int = 0  # connections that had to wait in the queue
    downstream_cx_queue_timeout: int = 0  # refused after queueTimeout in the queue
    downstream_cx_overflow: int = 0  # refused at once: over the limits and the queue full
    upstream_cx_overflow: int = 0  # admitted, then every endpoint was at its limit
    downstream_cx_fd_exhausted: int = 0  # reset: no descriptor left for the upstream socket
    downstream_cx_proxy_header_invalid: int = 0  # trusted source, header missing or malformed
    affinity_overflow: int = 0  # of affinity tables a reload switched off
    splice_switches: int = 0  # connection directions that went bulk and moved to splice(2)
    splice_fallbacks: int = 0  # went bulk, but no pipe or descriptor for splice: stayed
    splice_bytes: int = 0  # bytes moved by splice (also in the per-direction byte counters)

    def udp_drops(self) -> dict[str, int]:
        """New UDP clients whose datagram was dropped instead of starting a session, by reason."""
        return {
            "overflow": self.udp_sess_overflow,
            "no_endpoint": self.udp_sess_no_endpoint,
            "create_fail": self.udp_sess_create_fail,
            "source_range": self.udp_sess_source_range,
        }

    def refusals(self) -> dict[str, int]:
        """Connections reset instead of served, by reason (the metric's ``reason`` label)."""
        return {
            "no_endpoint": self.downstream_cx_refused_no_endpoint,
            "overflow": self.downstream_cx_overflow,
            "queue_timeout": self.downstream_cx_queue_timeout,
            "endpoint_limits": self.upstream_cx_overflow,
            "fd_exhausted": self.downstream_cx_fd_exhausted,
            "proxy_header_invalid": self.downstream_cx_proxy_header_invalid,
            "source_range": self.downstream_cx_refused_source_range,
        }


# kube-proxy's network programming latency is usually well under a second, but bounded
# frequency (minSyncPeriod) and large applies push it to seconds.
NETWORK_PROGRAMMING_SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0
)  # fmt: skip


@dataclass(slots=True)
class KubernetesStats:
    """The Kubernetes API source (``lbd run --kubernetes``); written by its event loop only.

    ``connected``, ``synced`` and ``last_sync_time`` are what health and readiness read: the
    state being served is as old as ``last_sync_time`` while ``connected`` is False."""

    connected: bool = False  # every watch is open (False from the first failure to recovery)
    synced: bool = False  # the first full list of every kind was applied
    last_sync_time: float = 0.0  # wall clock of the last apply of the API's state (or no-op)
    events: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, type) -> count
    relists: dict[str, int] = field(default_factory=dict)  # kind -> lists after the first
    errors: dict[str, int] = field(default_factory=dict)  # kind -> failed requests or streams
    syncs: dict[str, int] = field(default_factory=dict)  # applied / unchanged / failed
    services_rejected: int = 0  # an invalid update: the service kept its last good form
    service_ips_skipped: int = 0  # externalIPs / LoadBalancer IPs outside the allow-list
    network_programming_seconds: Buckets = field(
        default_factory=lambda: Buckets(NETWORK_PROGRAMMING_SECONDS_BUCKETS)
    )
