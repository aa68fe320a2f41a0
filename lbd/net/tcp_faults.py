"""TCP faults and mirroring, chosen once per connect try (docs/faults.md).

A service port without faults or a mirror never comes here: its connect tries see
``route.faults is None`` and make a plain ``Upstream`` (``lbd.net.connect``). For a port with
some, ``upstream`` decides, once per try, what this connection gets:

- a ``refuse`` fault: the whole connection is reset before any endpoint is tried (port-wide
  faults, rolled on the first try), or the chosen endpoint "refuses" the connect (faults scoped
  to endpoints): lbd counts a failed connect against it, as for a real refusal (outlier
  detection sees it), and tries the next;
- every other fault in scope whose probability roll succeeds, and the mirror if its percent
  roll does: a ``FaultyUpstream``, whose ``connection_made`` puts a ``FaultyTransport``
  (``lbd.net.fault_transport``) in front of both of the connection's transports, starts the
  connection-wide timers (``reset_peer``, ``timeout``) and the mirror's copy;
- nothing: a plain ``Upstream``, exactly as without faults.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

from lbd.config.faultspec import Mirror
from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.endpoints.faults import LiveFault, RouteFaults
from lbd.endpoints.route import Route
from lbd.net.connections import ConnectionSet
from lbd.net.fault_transport import DirectionFaults, FaultyTransport
from lbd.net.mirror import Shadow
from lbd.net.tcp_upstream import Upstream, UpstreamOwner


class Faultable(UpstreamOwner, Protocol):
    """What the faults need of a client connection (``lbd.net.tcp_proxy.Downstream``)."""

    route: Route
    connections: ConnectionSet[Any]


def upstream(
    connection: Faultable,
    endpoint: UpstreamEndpoint,
    faults: RouteFaults,
    tried: list[UpstreamEndpoint],
) -> Upstream | None:
    """The upstream half for this try, or None when a ``refuse`` fault acted: the connection
    has been reset (``connection.closed``), or else ``endpoint`` refused this try."""
    applied: list[LiveFault] = []
    for fault in faults.tcp:
        spec = fault.spec
        if not fault.covers(endpoint):
            continue
        if spec.type != "refuse":
            if faults.roll(spec.probability):
                applied.append(fault)
        elif (spec.endpoints or not tried) and faults.roll(spec.probability):
            fault.stats.fault_applied_total += 1
            if not spec.endpoints:
                _refuse(connection, fault)
            return None
    mirror = faults.mirror
    if mirror is not None and not faults.roll(mirror.percent / 100):
        mirror = None
    if not applied and mirror is None:
        return Upstream(connection, endpoint, tried)
    return FaultyUpstream(connection, endpoint, tried, Arrangement(faults, applied, mirror))


def _refuse(connection: Faultable, fault: LiveFault) -> None:
    fault.stats.fault_cx_cut_total += 1
    connection.route.stats.downstream_cx_refused_total.fault += 1
    connection.finish("fault_refuse", abort=True)


class Arrangement:
    """What one connection took: its faults per direction, its timers, its mirror's copy."""

    __slots__ = ("applied", "faults", "mirror", "shadow", "timers")

    def __init__(
        self, faults: RouteFaults, applied: list[LiveFault], mirror: Mirror | None
    ) -> None:
        self.faults = faults
        self.applied = applied
        self.mirror = mirror  # the port's, when this connection's percent roll took it
        self.shadow: Shadow | None = None
        self.timers: list[asyncio.TimerHandle] = []

    def arrange(self, upstream: Upstream, owner: Faultable) -> None:
        """Both transports of the connection get a FaultyTransport in front; the
        connection-wide faults start their timers."""
        loop = owner.loop
        client = owner.transport
        assert client is not None
        lingering = owner.connections.lingering
        rng = self.faults.rng

        def cut(fault: LiveFault, reason: str, abort: bool = False) -> None:
            if fault.live and not owner.closed:
                fault.stats.fault_cx_cut_total += 1
                owner.finish(reason, abort=abort)

        applied = self.applied
        for fault in applied:
            fault.stats.fault_applied_total += 1
        towards_client = DirectionFaults([f for f in applied if f.spec.downstream])
        towards_endpoint = DirectionFaults([f for f in applied if f.spec.upstream])
        client_side = FaultyTransport(client, loop, towards_client, rng, cut, lingering)
        endpoint_side = FaultyTransport(
            upstream.transport, loop, towards_endpoint, rng, cut, lingering
        )
        client_side.peer, endpoint_side.peer = endpoint_side, client_side
        route = owner.route
        if self.mirror is not None:
            self.shadow = endpoint_side.mirror = Shadow(
                loop, self.mirror, route.stats, lingering, route.tunables.connect_timeout
            )
        owner.transport = cast(asyncio.Transport, client_side)
        upstream.transport = cast(asyncio.Transport, endpoint_side)
        for fault in applied:
            spec = fault.spec
            if spec.type == "reset_peer":
                handle = loop.call_later(spec.timeout, cut, fault, "fault_reset_peer", True)
            elif spec.type == "timeout" and spec.timeout > 0:
                handle = loop.call_later(spec.timeout, cut, fault, "fault_timeout")
            else:
                continue
            self.timers.append(handle)

    def ended(self) -> None:
        """The endpoint's socket is closed: the connection is over."""
        for timer in self.timers:
            timer.cancel()
        self.timers = []
        if self.shadow is not None:
            self.shadow.close()
            self.shadow = None


class FaultyUpstream(Upstream):
    """An ``Upstream`` that arranges its connection's faults the moment it connects."""

    __slots__ = ("arrangement", "owner")

    def __init__(
        self,
        downstream: Faultable,
        endpoint: UpstreamEndpoint,
        tried: list[UpstreamEndpoint],
        arrangement: Arrangement,
    ) -> None:
        super().__init__(downstream, endpoint, tried)
        self.owner = downstream
        self.arrangement = arrangement

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        owner = self.owner
        if not owner.closed and not self.timed_out:
            self.arrangement.arrange(self, owner)
        owner.attach(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.arrangement.ended()
        super().connection_lost(exc)
