"""A Route is one service port as the data path sees it: where to send and how.

It keeps the frozen ``RouteSpec`` it was built from (``spec``, with the port's ``Tunables``) and
the live objects derived from it: the pool, the balancer, admission, outlier detection and
affinity. A reload swaps the spec in place (``update``): counters, pool members and the
balancer's position survive. The data path reads ``route.tunables`` per connection.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection, Sequence

from lbd.balancing import Balancer, make_balancer
from lbd.config.faultspec import Fault
from lbd.config.model import Tunables
from lbd.config.routes import RouteSpec
from lbd.endpoints.admission import Admission
from lbd.endpoints.affinity import AffinityTable, SharedAffinityTable
from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.faults import LiveFault, RouteFaults
from lbd.endpoints.outlier import OutlierDetector
from lbd.endpoints.pool import Pool
from lbd.observability.logging import LogLimiter
from lbd.observability.stats import RouteStats
from lbd.shm.counts import EndpointSlots

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Route:
    __slots__ = (
        "admission",
        "affinity",
        "balancer",
        "fault_book",
        "faults",
        "fd_exhausted_logged_at",
        "hash_port",
        "log_limiter",
        "namespace",
        "outlier",
        "pool",
        "port_name",
        "protocol",
        "removed",
        "service",
        "source_ranges",
        "spec",
        "stats",
        "trusted_proxies",
        "tunables",
    )

    def __init__(
        self, spec: RouteSpec, rng: random.Random | None = None, slots: EndpointSlots | None = None
    ) -> None:
        self.namespace = spec.namespace
        self.service = spec.service
        self.port_name = spec.port_name  # the port's name, or its number when unnamed
        self.protocol = spec.protocol
        self.spec = spec
        self.tunables: Tunables = spec.tunables
        self.pool = Pool(
            name=spec.label,
            slow_start=spec.tunables.slow_start,
            policy=spec.policy,
            slots=slots,
            route_key=spec.key,
        )
        self.pool.update(spec.targets)
        self.balancer: Balancer = _balancer(spec.tunables, rng)
        self.removed = False  # no longer in the config: its connections drain
        self.stats = RouteStats()
        self.admission: Admission | None = None  # None while the port has no limits
        self.outlier: OutlierDetector | None = None
        self.affinity: AffinityTable | None = None  # sessionAffinity: ClientIP
        self.source_ranges: tuple[Network, ...] = ()  # for loadBalancerIP listeners; () allows all
        # acceptProxyProtocolFrom, parsed once: the data path checks each client against it.
        self.trusted_proxies: tuple[Network, ...] = ()
        self.fd_exhausted_logged_at = float("-inf")
        # Connect-failure warnings: at most one a second per endpoint (and per route for "no
        # endpoint accepted"); the metrics count every failure.
        self.log_limiter = LogLimiter()
        # Load-test faults and the mirror (docs/faults.md): the book always, ``faults`` only
        # while it holds something, so the data path's one check per connection is ``is None``.
        self.fault_book = RouteFaults(rng or random.Random())
        self.faults: RouteFaults | None = None
        self._apply_tunables()
        self._apply_semantics(spec)
        self.pool.watch(self._pool_changed)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.service}:{self.port_name}"

    @property
    def external_name(self) -> str | None:
        """The pool is filled by a resolver of this name, not by the config."""
        return self.spec.external_name

    def update(self, spec: RouteSpec, rng: random.Random | None = None) -> None:
        """Swap in a changed spec: counters, pool members and (unless the strategy changed)
        the balancer's position survive."""
        new, old = spec.tunables, self.tunables
        if (new.strategy, new.maglev_table_size) != (old.strategy, old.maglev_table_size):
            self.balancer = _balancer(new, rng)
        named_before = self.external_name
        self.spec = spec
        self.tunables = spec.tunables
        self.pool.slow_start = spec.tunables.slow_start
        self._apply_tunables()
        self._apply_semantics(spec)
        if spec.external_name is None:
            self.pool.update(spec.targets)
        elif spec.external_name != named_before:
            self.pool.update(())  # the new name's resolver fills it (lbd.runtime.dns)
        # else: the service's resolver owns the pool and re-applies its last answer

    def pick(
        self,
        eligible: Sequence[UpstreamEndpoint],
        client: str,
        now: float,
        tried: Collection[UpstreamEndpoint] = (),
        client_port: int = 0,
    ) -> UpstreamEndpoint | None:
        """The endpoint for a new connection or session: the client's affinity entry while it
        is eligible and untried, else the balancer's choice (then recorded). A hash-based
        strategy hashes the client's address, or address and port (``hashOn: clientIPPort``)."""
        key = f"{client}:{client_port}" if self.hash_port else client
        affinity = self.affinity
        if affinity is None:
            return self.balancer.pick(eligible, key, tried)
        endpoint = affinity.lookup(client, now, eligible)
        if endpoint is None or endpoint in tried or endpoint not in eligible:
            endpoint = self.balancer.pick(eligible, key, tried)
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

    def add_fault(self, fault_id: str, spec: Fault) -> LiveFault:
        """A fault from the admin API: new connections (and datagrams) of this port take it."""
        fault = self.fault_book.add(fault_id, spec)
        self.faults = self.fault_book
        return fault

    def remove_fault(self, fault_id: str) -> LiveFault | None:
        fault = self.fault_book.remove(fault_id)
        self.faults = None if self.fault_book.empty else self.fault_book
        return fault

    def _pool_changed(self, pool: Pool) -> None:
        if self.affinity is not None:
            self.affinity.forget({*pool.eligible(), *pool.eligible(external=True)})

    def _apply_tunables(self) -> None:
        """Derive the data path's helpers from the tunables (at build and on every update)."""
        tunables = self.tunables
        self.hash_port = tunables.hash_on == "clientIPPort"  # hash-based strategies' key
        self.trusted_proxies = tuple(
            ipaddress.ip_network(cidr) for cidr in tunables.accept_proxy_protocol_from
        )
        if self.admission is not None:
            # Keep the object: its slot count and queue belong to connections still open.
            self.admission.tunables = tunables
            self.admission.wake()
        elif tunables.limited:
            self.admission = Admission(tunables, self.pool, self.stats)
        spec = tunables.outlier_detection
        if spec is None:
            self.outlier = None
        elif self.outlier is None or self.outlier.spec != spec:
            previous = self.outlier
            self.outlier = OutlierDetector(self.pool, spec)
            if previous is not None:  # counters are monotonic across a changed spec
                self.outlier.ejections_total = previous.ejections_total
                self.outlier.ejections_overflow_total = previous.ejections_overflow_total
        self.pool.on_check_passed = self.outlier.check_passed if self.outlier else None
        prefix = f"{self.namespace}.{self.service}.{self.port_name}"
        self.fault_book.configure(prefix, tunables.faults, tunables.mirror)
        self.faults = None if self.fault_book.empty else self.fault_book

    def _apply_semantics(self, spec: RouteSpec) -> None:
        """The Kubernetes Service settings that a reload may switch on, off, or change."""
        if spec.affinity_timeout is None:
            if self.affinity is not None:  # its counter lives on in the route's (never goes down)
                self.stats.affinity_overflow_retired += self.affinity.overflow
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
        self.pool.set_policy(spec.policy)


def _balancer(tunables: Tunables, rng: random.Random | None) -> Balancer:
    return make_balancer(tunables.strategy, rng, tunables.maglev_table_size)
