"""The endpoints of one service port and their live state: the single owner of eligibility.

Config says "exists" (``update``), the active checks say "live" (``set_healthy``, reported by
the health registry, which owns the check state), outlier detection says "not ejected"
(``set_ejected``), the admin API may drain; ``eligible()`` needs all of them. When only
unhealthy or ejected endpoints are left, the pool panics and uses them all, as Envoy does: a
check that wrongly fails everywhere must not turn into a full outage. Active connection
counts are written only through ``acquire``/``release`` so that moving the counts somewhere
shared between workers is a change inside this class, not a rewrite of its callers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import structlog

from lbd.config.routes import CLUSTER, READY_STATE, EndpointState, RouteKey, TrafficPolicy
from lbd.endpoints import topology
from lbd.endpoints.endpoint import PANIC_REASONS, UpstreamEndpoint, ineligible_reason
from lbd.shm.counts import EndpointSlots

log = structlog.get_logger("lbd.endpoints.pool")

PoolWatcher = Callable[["Pool"], None]
Wanted = tuple[str, int, int] | tuple[str, int, int, EndpointState]


class Pool:
    """Watchers (``watch``) are told, synchronously, whenever the members or the eligible
    endpoints change, so state tied to an endpoint (UDP sessions) can follow at once: a
    datagram that arrives after ``update()`` returns already sees the new endpoints."""

    __slots__ = (
        "_ejected",
        "_eligible",
        "_external",
        "_usable",
        "_watchers",
        "draining",
        "members",
        "name",
        "on_check_passed",
        "panic",
        "panics",
        "policy",
        "route_key",
        "slots",
        "slow_start",
    )

    def __init__(
        self,
        members: Iterable[UpstreamEndpoint] = (),
        name: str = "",
        slow_start: float = 0.0,
        policy: TrafficPolicy = CLUSTER,
        slots: EndpointSlots | None = None,
        route_key: RouteKey = ("", ""),
    ) -> None:
        self.name = name  # the route's label, for logs
        self.slow_start = slow_start
        self.panic = False
        self.panics = 0  # times the pool entered panic mode
        self.slots = slots  # several workers: new endpoints get their shared counter slot
        self.route_key = route_key
        self.members: list[UpstreamEndpoint] = list(members)
        self.policy = policy
        # Removed by a reload but still carrying connections: shown by the admin API and
        # metrics until the last one ends (``release``); re-adding one revives the same
        # object, so its active count (least-connection) stays right.
        self.draining: list[UpstreamEndpoint] = []
        self._eligible: list[UpstreamEndpoint] = []
        self._external: list[UpstreamEndpoint] = []  # for listeners other than clusterIP
        self._usable: list[UpstreamEndpoint] = []
        self._watchers: list[PoolWatcher] = []
        self._ejected: dict[tuple[str, int], UpstreamEndpoint] = {}  # by outlier detection
        # Outlier detection's hook: an active check passed for an ejected member.
        self.on_check_passed: Callable[[UpstreamEndpoint], None] | None = None
        self._refresh()

    def watch(self, watcher: PoolWatcher) -> Callable[[], None]:
        """Call ``watcher(pool)`` after every change of members or eligibility; returns the
        function that stops it. Watchers must not raise: they run inside ``update``."""
        self._watchers.append(watcher)

        def unwatch() -> None:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return unwatch

    def refresh(self) -> None:
        """Recompute eligibility after an endpoint's state changed (e.g. health)."""
        self._refresh()

    def eligible(self, external: bool = False) -> list[UpstreamEndpoint]:
        """Endpoints that may take a new connection from a clusterIP listener (``external``:
        from any other listener kind), after the traffic policy. Do not mutate the list."""
        return self._external if external else self._eligible

    def usable(self) -> list[UpstreamEndpoint]:
        """Eligible by their own state (panic mode included), before the traffic policy and
        endpoint conditions (``lbd.endpoints.topology``). Do not mutate the returned list."""
        return self._usable

    def set_policy(self, policy: TrafficPolicy) -> None:
        if policy != self.policy:
            self.policy = policy
            self._refresh()

    def acquire(self, endpoint: UpstreamEndpoint) -> None:
        endpoint.active_here += 1
        shared = endpoint.shared
        if shared is not None:
            shared.add(endpoint.slot, 1)

    def release(self, endpoint: UpstreamEndpoint) -> None:
        endpoint.active_here -= 1
        shared = endpoint.shared
        if shared is not None:
            shared.add(endpoint.slot, -1)
        if endpoint.draining and not endpoint.active_here and endpoint in self.draining:
            self.draining.remove(endpoint)

    def update(self, wanted: Iterable[Wanted]) -> tuple[int, int]:
        """Make the members (address, port, weight); keep the objects of endpoints that stay so
        their counts and balancer positions survive. Returns (added, removed).

        Admin overrides survive an update that leaves the endpoint as it was, and are cleared
        by one that changes it (its config weight, or its removal)."""
        current = {member.key: member for member in self.members}
        ramp = bool(current)  # the first endpoints of a pool have nothing to protect
        removed = len(current)
        current.update((m.key, m) for m in self.draining if m.key not in current)
        members: list[UpstreamEndpoint] = []
        added = 0
        states_changed = False
        for target in wanted:
            address, port, weight = target[0], target[1], target[2]
            state = target[3] if len(target) > 3 else READY_STATE
            member = current.pop((address, port), None)
            if member is None or member.draining:
                added += 1
            else:
                removed -= 1
            if member is None:
                member = self._new_endpoint(address, port, weight)
                if ramp:
                    member.start_ramp(self.slow_start)
            elif member.draining or member.config_weight != weight:
                member.config_weight = weight
                member.clear_overrides()
            member.draining = False
            states_changed = states_changed or member.state != state
            member.state = state
            members.append(member)
        for gone in current.values():
            if not gone.draining:
                gone.draining = True
                gone.clear_overrides()
        changed = members != self.members or states_changed
        self.members = members
        self.draining = [m for m in current.values() if m.active_here]
        self._refresh(changed)
        return added, removed

    def _new_endpoint(self, address: str, port: int, weight: int) -> UpstreamEndpoint:
        if self.slots is None:
            return UpstreamEndpoint(address, port, weight)
        slot = self.slots.slot_of(self.route_key, address, port)
        return UpstreamEndpoint(address, port, weight, self.slots.counts, slot)

    def drain_all(self) -> None:
        """The service port is gone: every endpoint drains."""
        self.update(())

    def find(self, address: str, port: int | None = None) -> list[UpstreamEndpoint]:
        """Current members at ``address`` (and ``port``, when given)."""
        return [
            m for m in self.members if m.address == address and (port is None or m.port == port)
        ]

    def member(self, key: tuple[str, int]) -> UpstreamEndpoint | None:
        for member in self.members:
            if member.key == key:
                return member
        return None

    def set_healthy(self, key: tuple[str, int], healthy: bool) -> None:
        """The health registry's report for the endpoint (address, port)."""
        member = self.member(key)
        if member is None or member.healthy == healthy:
            return
        member.healthy = healthy
        if healthy and not member.ejected:
            member.start_ramp(self.slow_start)
        self._refresh()

    def check_passed(self, key: tuple[str, int]) -> None:
        """The health registry: an active check of the endpoint (address, port) passed while
        it is healthy. An ejected member goes back at once (outlier detection decides)."""
        member = self._ejected.get(key)
        if member is not None and self.on_check_passed is not None:
            self.on_check_passed(member)

    def set_ejected(self, member: UpstreamEndpoint, ejected: bool) -> None:
        """Outlier detection's verdict on one member."""
        if member.ejected == ejected:
            return
        member.ejected = ejected
        if ejected:
            self._ejected[member.key] = member
        else:
            self._ejected.pop(member.key, None)
        if not ejected and member.healthy:
            member.start_ramp(self.slow_start)
        self._refresh()

    def set_admin_drained(self, endpoint: UpstreamEndpoint, drained: bool) -> None:
        endpoint.admin_drained = drained
        self._refresh()

    def set_weight_override(self, endpoint: UpstreamEndpoint, weight: int | None) -> None:
        endpoint.weight_override = weight
        endpoint.weight = endpoint.config_weight if weight is None else weight
        self._refresh()

    def _refresh(self, members_changed: bool = False) -> None:
        usable: list[UpstreamEndpoint] = []
        sick: list[UpstreamEndpoint] = []
        for member in self.members:
            reason = ineligible_reason(member)
            if reason is None:
                usable.append(member)
            elif reason in PANIC_REASONS:
                sick.append(member)
        panic = not usable and bool(sick)
        if panic != self.panic:
            self.panic = panic
            if panic:
                self.panics += 1
                log.warning("panic mode: no healthy endpoint, using all", route=self.name)
            else:
                log.info("panic mode over", route=self.name, healthy=len(usable))
        # Eligible by their own state (health, panic included); then the listener kinds' views.
        usable = sick if panic else usable
        self._usable = usable
        eligible = topology.select(usable, self.policy, external=False)
        external = _external_view(usable, eligible, self.policy)
        # Endpoints compare by identity: a list equal to the old one is the same endpoints.
        changed = members_changed or eligible != self._eligible or external != self._external
        self._eligible = eligible
        self._external = external
        if changed:
            for watcher in list(self._watchers):
                watcher(self)


def _external_view(
    usable: Sequence[UpstreamEndpoint], internal: list[UpstreamEndpoint], policy: TrafficPolicy
) -> list[UpstreamEndpoint]:
    if policy.external_local == policy.internal_local:
        return internal  # the same rule: one list, computed once
    return topology.select(usable, policy, external=True)
