"""Which endpoints of a service port may take a connection from a client, and why not the others.

``explain`` is the one place that answers this for people (``/explain``, ``lbd explain``); it
asks the same function the pool builds its eligible list with (``ineligible_reason``), so the
answer is what the data path does. Checks that depend on the client or on the node (session
affinity, topology: ``other_node``, ``other_zone``, ``affinity``) extend ``explain`` here, after
the endpoint's own state.
"""

from __future__ import annotations

from dataclasses import dataclass

from lbd.pool import REASONS, UpstreamEndpoint, ineligible_reason
from lbd.route import Route


@dataclass(frozen=True, slots=True)
class Verdict:
    endpoint: UpstreamEndpoint
    reason: str | None  # a code from lbd.pool.REASONS; None when eligible

    @property
    def eligible(self) -> bool:
        return self.reason is None

    @property
    def detail(self) -> str | None:
        return REASONS.get(self.reason) if self.reason is not None else None


def explain(route: Route, client: str = "") -> list[Verdict]:
    """Every endpoint of ``route`` (draining ones included), with the reason it may not take a
    new connection from ``client``. ``client`` is unused until per-client checks exist."""
    del client
    return [
        Verdict(endpoint, ineligible_reason(endpoint))
        for endpoint in (*route.pool.members, *route.pool.draining)
    ]
