"""One endpoint of a service port and the rule that decides whether it may take a connection."""

from __future__ import annotations

import socket
import time

from lbd.config.routes import READY_STATE, EndpointState
from lbd.observability.stats import EndpointStats
from lbd.shm.counts import SharedCounts

# Why an endpoint takes no new connections, as codes (stable, for /explain and tooling) with
# what they mean. Pool-wide ones are checked in ``ineligible_reason``; the per listener kind or
# per client ones (not_ready, other_node, other_zone, affinity...) in ``lbd.endpoints.topology`` and
# ``lbd.endpoints.explain``.
REASONS: dict[str, str] = {
    "draining": "removed from the config; kept only while its connections finish",
    "admin_drained": "drained through the admin API",
    "weight_zero": "weight is 0",
    "unhealthy": "failing its active health checks (healthCheck)",
    "ejected": "ejected after consecutive connect failures (outlierDetection)",
    # Kubernetes semantics (lbd.endpoints: topology, affinity, route): per listener kind or client.
    "not_ready": "not ready, and not serving-terminating while no endpoint is ready",
    "terminating": "terminating: used only while no endpoint is ready",
    "other_node": "on another node, and this listener's traffic policy is Local",
    "other_zone": "in another zone, and trafficDistribution: PreferClose has closer endpoints",
    "affinity": "sessionAffinity keeps this client on another endpoint",
    "source_range": "the client is outside loadBalancerSourceRanges",
}
# Reasons a pool in panic mode ignores: when every endpoint is unhealthy or ejected, all of
# them are used rather than none (Envoy's panic threshold at 0%).
PANIC_REASONS = frozenset({"unhealthy", "ejected"})
# During slow start the weight ramps from this share of the full weight up to all of it.
RAMP_FLOOR = 0.01


class UpstreamEndpoint:
    """One (address, port) that connections of a service port can be sent to."""

    __slots__ = (
        "active_here",
        "address",
        "admin_drained",
        "config_weight",
        "draining",
        "ejected",
        "family",
        "healthy",
        "port",
        "ramp_end",
        "ramp_length",
        "shared",
        "slot",
        "state",
        "static_weight",
        "stats",
        "weight_override",
    )

    def __init__(
        self,
        address: str,
        port: int,
        weight: int = 1,
        shared: SharedCounts | None = None,
        slot: int = -1,
    ) -> None:
        self.address = address
        self.port = port
        self.static_weight: float = weight  # the override if one is set, else config's
        self.config_weight = weight
        self.weight_override: int | None = None  # set through the admin API
        self.admin_drained = False  # set through the admin API
        self.active_here = 0  # connections of this process
        # Set when several workers share the counts: this endpoint's column (for its lifetime).
        self.shared = shared if slot >= 0 else None
        self.slot = slot
        self.draining = False  # removed from the config; kept while connections remain
        self.healthy = True  # as the active checks last reported; config says ready
        self.ejected = False  # by outlier detection
        self.ramp_end = 0.0  # slow start: monotonic time the ramp ends; 0 when not ramping
        self.ramp_length = 0.0
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.stats = EndpointStats()
        self.state: EndpointState = READY_STATE  # conditions and topology, from the config

    @property
    def weight(self) -> float:
        """What balancers use: the override or config weight, ramping up linearly during
        slow start (a fraction then, which every balancer handles)."""
        full = self.static_weight
        if not self.ramp_end:
            return full
        left = self.ramp_end - time.monotonic()
        if left <= 0:
            self.ramp_end = 0.0
            return full
        return full * max(RAMP_FLOOR, 1.0 - left / self.ramp_length)

    @weight.setter
    def weight(self, value: float) -> None:
        self.static_weight = value

    def start_ramp(self, seconds: float) -> None:
        if seconds > 0:
            self.ramp_length = seconds
            self.ramp_end = time.monotonic() + seconds

    @property
    def active(self) -> int:
        """Open connections to the endpoint in every worker (what least-connection compares)."""
        if self.shared is None:
            return self.active_here
        return self.shared.total(self.slot)

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.family == socket.AF_INET6 else self.address
        return f"{host}:{self.port}"

    def __repr__(self) -> str:
        return f"UpstreamEndpoint({self}, weight={self.weight}, active={self.active})"

    @property
    def overridden(self) -> bool:
        return self.admin_drained or self.weight_override is not None

    def clear_overrides(self) -> None:
        self.admin_drained = False
        self.weight_override = None
        self.weight = self.config_weight


def ineligible_reason(endpoint: UpstreamEndpoint) -> str | None:
    """Why ``endpoint`` may not take a new connection (a ``REASONS`` code), or None.

    The one place that decides eligibility from the endpoint's own state: ``Pool`` builds its
    eligible list with it and ``/explain`` reports it, so the two never disagree.
    """
    if endpoint.draining:
        return "draining"
    if endpoint.admin_drained:
        return "admin_drained"
    if endpoint.static_weight <= 0:
        return "weight_zero"
    if not endpoint.healthy:
        return "unhealthy"
    if endpoint.ejected:
        return "ejected"
    return None
