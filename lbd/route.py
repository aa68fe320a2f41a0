"""A Route is one service port as the data path sees it: where to send and how.

It holds plain values (no YAML, no config objects on the hot path). The runtime builds it from
the config and may change it in place on reload; the data path reads it per connection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lbd.balancing import Balancer, make_balancer
from lbd.config.model import StrategyName
from lbd.config.routes import RouteSpec
from lbd.observability.stats import CX_LENGTH_SECONDS_BUCKETS, Buckets
from lbd.pool import Pool

# Tries of one client connection: each picks an endpoint not tried yet. Per-try timeouts grow
# as kube-proxy's userspace proxier did (250 ms, 500 ms, 1 s ...), scaled to connectTimeout:
# a refused connect fails at once anyway, and a black-holed endpoint should not hold the
# client for a full connectTimeout while other endpoints wait for their chance. The last
# candidate always gets the full connectTimeout, so a one-endpoint service is never cut short.
MAX_CONNECT_TRIES = 8
TRY_TIMEOUT_SCALE = (0.25, 0.5)


def try_timeout(connect_timeout: float, attempt: int, candidates_left: int) -> float:
    if candidates_left > 1 and attempt < len(TRY_TIMEOUT_SCALE):
        return connect_timeout * TRY_TIMEOUT_SCALE[attempt]
    return connect_timeout


@dataclass(slots=True)
class RouteStats:
    """Counters of one route; the single writer is the worker's event loop. Per-endpoint
    counters live on each ``UpstreamEndpoint.stats``; ``lbd.observability.metrics`` exports
    both at scrape time."""

    downstream_cx_total: int = 0
    downstream_cx_active: int = 0
    downstream_cx_refused_no_endpoint: int = 0
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


@dataclass(slots=True, eq=False)
class Route:
    namespace: str
    service: str
    port_name: str  # the port's name, or its number when unnamed
    protocol: str
    strategy: StrategyName
    balancer: Balancer
    pool: Pool
    connect_timeout: float
    idle_timeout: float
    drain_timeout: float
    access_log: bool
    udp_idle_timeout: float = 30.0
    max_udp_sessions: int = 65536
    stats: RouteStats = field(default_factory=RouteStats)
    removed: bool = False  # no longer in the config: its connections drain

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}"

    @classmethod
    def from_spec(cls, spec: RouteSpec, rng: random.Random | None = None) -> Route:
        pool = Pool()
        pool.update(spec.targets)
        return cls(
            namespace=spec.namespace,
            service=spec.service,
            port_name=spec.port_name,
            protocol=spec.protocol,
            strategy=spec.strategy,
            balancer=make_balancer(spec.strategy, rng),
            pool=pool,
            connect_timeout=spec.connect_timeout,
            idle_timeout=spec.idle_timeout,
            drain_timeout=spec.drain_timeout,
            access_log=spec.access_log,
            udp_idle_timeout=spec.udp_idle_timeout,
            max_udp_sessions=spec.max_udp_sessions,
        )

    def update(self, spec: RouteSpec, rng: random.Random | None = None) -> None:
        """Apply a changed spec in place: counters, pool members and (unless the strategy
        changed) the balancer's position survive."""
        if spec.strategy != self.strategy:
            self.strategy = spec.strategy
            self.balancer = make_balancer(spec.strategy, rng)
        self.connect_timeout = spec.connect_timeout
        self.idle_timeout = spec.idle_timeout
        self.drain_timeout = spec.drain_timeout
        self.access_log = spec.access_log
        self.udp_idle_timeout = spec.udp_idle_timeout
        self.max_udp_sessions = spec.max_udp_sessions
        self.pool.update(spec.targets)
