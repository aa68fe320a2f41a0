"""A Route is one service port as the data path sees it: where to send and how.

It holds plain values (no YAML, no config objects on the hot path). The runtime builds it from
the config and may change it in place on reload; the data path reads it per connection.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lbd.balancing import Balancer, make_balancer
from lbd.config.model import Service, ServicePort, StrategyName
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
    cx_length_seconds: Buckets = field(default_factory=lambda: Buckets(CX_LENGTH_SECONDS_BUCKETS))


@dataclass(slots=True, eq=False)
class Route:
    namespace: str
    service: str
    port_name: str  # the port's name, or its number when unnamed
    strategy: StrategyName
    balancer: Balancer
    pool: Pool
    connect_timeout: float
    idle_timeout: float
    drain_timeout: float
    access_log: bool
    stats: RouteStats = field(default_factory=RouteStats)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}"


def endpoint_targets(service: Service, port: ServicePort) -> list[tuple[str, int, int]]:
    """(address, port, weight) of every endpoint that serves this port."""
    targets: list[tuple[str, int, int]] = []
    for endpoint in service.endpoints:
        number = endpoint.target_port(port.target_port)
        if number is not None:
            targets.append((endpoint.address, number, endpoint.weight))
    return targets


def build_route(service: Service, port: ServicePort, rng: random.Random | None = None) -> Route:
    pool = Pool()
    pool.update(endpoint_targets(service, port))
    return Route(
        namespace=service.namespace,
        service=service.name,
        port_name=port.name or str(port.port),
        strategy=service.strategy,
        balancer=make_balancer(service.strategy, rng),
        pool=pool,
        connect_timeout=service.timeouts.connect,
        idle_timeout=service.timeouts.idle,
        drain_timeout=service.timeouts.drain,
        access_log=service.access_log,
    )
