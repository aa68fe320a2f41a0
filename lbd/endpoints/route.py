"""A Route is one service port as the data path sees it: where to send and how.

It holds plain values (no YAML, no config objects on the hot path). The runtime builds it from
the config and may change it in place on reload; the data path reads it per connection.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from lbd.balancing import Balancer, make_balancer
from lbd.config.model import (
    HealthCheck,
    Limits,
    OutlierDetection,
    ProxyProtocol,
    StrategyName,
)
from lbd.config.routes import RouteSpec
from lbd.endpoints.admission import Admission
from lbd.endpoints.affinity import AffinityTable, SharedAffinityTable
from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.outlier import OutlierDetector
from lbd.endpoints.pool import Pool
from lbd.observability.logging import LogLimiter
from lbd.observability.stats import RouteStats
from lbd.shm.counts import EndpointSlots

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

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
    removed: bool = False  # no longer in the config: its connections drain
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    limits: Limits = field(default_factory=Limits)
    half_closed_timeout: float = 60.0
    max_duration: float | None = None
    proxy_protocol: ProxyProtocol = field(default_factory=ProxyProtocol)
    outlier: OutlierDetector | None = None
    splice: bool = True  # a bulk TCP direction may move to splice(2) (lbd.net.splice)
    stats: RouteStats = field(default_factory=RouteStats)
    admission: Admission | None = None  # None when the port has no limits
    fd_exhausted_logged_at: float = float("-inf")
    # Connect-failure warnings: at most one a second per endpoint (and per route for "no
    # endpoint accepted"); the metrics count every failure.
    log_limiter: LogLimiter = field(default_factory=LogLimiter)
    # acceptProxyProtocolFrom, parsed once: the data path checks each client against it.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    affinity: AffinityTable | None = None  # sessionAffinity: ClientIP
    source_ranges: tuple[Network, ...] = ()  # for loadBalancerIP listeners; () allows all
    external_name: str | None = None  # the pool is filled by a resolver, not the config

    def __post_init__(self) -> None:
        self._apply_protection()

    def _apply_protection(self) -> None:
        """Derive the data path's helpers from the settings (at build and on every update)."""
        self.trusted_proxies = tuple(
            ipaddress.ip_network(cidr) for cidr in self.proxy_protocol.accept_from
        )
        limits = self.limits
        if self.admission is not None:
            # Keep the object: its slot count and queue belong to connections still open.
            self.admission.limits = limits
            self.admission.wake()
        elif limits.max_connections is not None or limits.max_connections_per_endpoint:
            self.admission = Admission(limits, self.pool, self.stats)
        spec = self.outlier_detection
        if spec is None:
            self.outlier = None
        elif self.outlier is None or self.outlier.spec != spec:
            previous = self.outlier
            self.outlier = OutlierDetector(self.pool, spec)
            if previous is not None:  # counters are monotonic across a changed spec
                self.outlier.ejections_total = previous.ejections_total
                self.outlier.ejections_overflow_total = previous.ejections_overflow_total
        self.pool.on_check_passed = self.outlier.check_passed if self.outlier else None

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}"

    def pick(
        self,
        eligible: Sequence[UpstreamEndpoint],
        client: str,
        now: float,
        tried: Collection[UpstreamEndpoint] = (),
    ) -> UpstreamEndpoint | None:
        """The endpoint for a new connection or session: the client's affinity entry while it
        is eligible and untried, else the balancer's choice (then recorded)."""
        affinity = self.affinity
        if affinity is None:
            return self.balancer.pick(eligible, client, tried)
        endpoint = affinity.lookup(client, now, eligible)
        if endpoint is None or endpoint in tried or endpoint not in eligible:
            endpoint = self.balancer.pick(eligible, client, tried)
            if endpoint is None:
                return None
        affinity.record(client, endpoint, now)
        return endpoint

    def allows(self, client: str) -> bool:
        """Whether ``client`` is inside loadBalancerSourceRanges (checked on LB-IP listeners)."""
        ranges = self.source_ranges
        if not ranges:
            return True
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in network for network in ranges)

    def _pool_changed(self, pool: Pool) -> None:
        if self.affinity is not None:
            self.affinity.forget({*pool.eligible(), *pool.eligible(external=True)})

    def _apply_semantics(self, spec: RouteSpec) -> None:
        """The Kubernetes Service settings that a reload may switch on, off, or change."""
        if spec.affinity_timeout is None:
            if self.affinity is not None:  # its counter lives on in the route's (never goes down)
                self.stats.affinity_overflow += self.affinity.overflow
            self.affinity = None
        elif self.affinity is None:
            slots = self.pool.slots
            if slots is not None:  # several workers share counts and affinity
                self.affinity = SharedAffinityTable(
                    spec.affinity_timeout, slots.counts.affinity, self.pool
                )
            else:
                self.affinity = AffinityTable(spec.affinity_timeout)
        else:
            self.affinity.timeout = spec.affinity_timeout
        self.source_ranges = tuple(ipaddress.ip_network(r) for r in spec.source_ranges)
        self.external_name = spec.external_name
        self.pool.set_policy(spec.policy)

    @classmethod
    def from_spec(
        cls, spec: RouteSpec, rng: random.Random | None = None, slots: EndpointSlots | None = None
    ) -> Route:
        pool = Pool(
            name=spec.label,
            slow_start=spec.slow_start,
            policy=spec.policy,
            slots=slots,
            route_key=spec.key,
        )
        pool.update(spec.targets)
        route = cls(
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
            splice=spec.splice,
            udp_idle_timeout=spec.udp_idle_timeout,
            max_udp_sessions=spec.max_udp_sessions,
            health_check=spec.health_check,
            outlier_detection=spec.outlier_detection,
            limits=spec.limits,
            half_closed_timeout=spec.half_closed_timeout,
            max_duration=spec.max_duration,
            proxy_protocol=spec.proxy_protocol,
        )
        route._apply_semantics(spec)
        pool.watch(route._pool_changed)
        return route

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
        self.splice = spec.splice
        self.udp_idle_timeout = spec.udp_idle_timeout
        self.max_udp_sessions = spec.max_udp_sessions
        self.health_check = spec.health_check
        self.outlier_detection = spec.outlier_detection
        self.limits = spec.limits
        self.half_closed_timeout = spec.half_closed_timeout
        self.max_duration = spec.max_duration
        self.proxy_protocol = spec.proxy_protocol
        self.pool.slow_start = spec.slow_start
        self._apply_protection()
        named_before = self.external_name
        self._apply_semantics(spec)
        if spec.external_name is None:
            self.pool.update(spec.targets)
        elif spec.external_name != named_before:
            self.pool.update(())  # the new name's resolver fills it (lbd.runtime.dns)
        # else: the service's resolver owns the pool and re-applies its last answer
