"""Which endpoints of a service port may take a connection from a client, and why not the others.

``explain`` is the one place that answers this for people (``/explain``, ``lbd explain``); it
asks the same function the pool builds its eligible list with (``ineligible_reason``), so the
answer is what the data path does; the checks that depend on the listener kind, the node or the
client (``lbd.endpoints.topology``, source ranges, session affinity) follow, in the data
path's order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lbd.endpoints import topology
from lbd.endpoints.endpoint import REASONS, UpstreamEndpoint, ineligible_reason
from lbd.endpoints.route import Route


@dataclass(frozen=True, slots=True)
class Verdict:
    endpoint: UpstreamEndpoint
    reason: str | None  # a code from lbd.endpoints.pool.REASONS; None when eligible

    @property
    def eligible(self) -> bool:
        return self.reason is None

    @property
    def detail(self) -> str | None:
        return REASONS.get(self.reason) if self.reason is not None else None


def explain(
    route: Route,
    client: str = "",
    *,
    external: bool = False,
    filtered: bool = False,
    now: float | None = None,
) -> list[Verdict]:
    """Every endpoint of ``route`` (draining ones included), with the reason it may not take a
    new connection from ``client`` arriving on a listener of the given kind (``external``: not
    clusterIP; ``filtered``: a LoadBalancer IP, where loadBalancerSourceRanges apply).

    The order of checks is the data path's: the endpoint's own state, the listener kind's
    traffic policy and conditions (``lbd.endpoints.topology``), the client's source range, then its
    session affinity entry."""
    usable = route.pool.usable()
    eligible = route.pool.eligible(external)
    pinned = None
    if client and route.affinity is not None:
        pinned = route.affinity.lookup(client, time.monotonic() if now is None else now)
        if pinned not in eligible:
            pinned = None
    outside = bool(client) and filtered and not route.allows(client)
    verdicts = []
    for endpoint in (*route.pool.members, *route.pool.draining):
        reason = ineligible_reason(endpoint) or topology.reason(
            endpoint, usable, route.pool.policy, external
        )
        if reason is None and outside:
            reason = "source_range"
        if reason is None and pinned is not None and endpoint is not pinned:
            reason = "affinity"
        verdicts.append(Verdict(endpoint, reason))
    return verdicts
