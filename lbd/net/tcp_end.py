"""The last phase of a proxied TCP connection: what its end gives back and records.

Once ``Downstream.finish`` has closed (or reset) both sockets, the connection releases its
endpoint and its admission slot, adds its bytes and duration to the counters, leaves the
worker's set of live connections, and writes its access log line.
"""

from __future__ import annotations

from typing import Protocol

import structlog

from lbd.endpoints.endpoint import UpstreamEndpoint
from lbd.net import tcp_accept

log = structlog.get_logger("lbd.tcp")


class Ending(tcp_accept.Accepting, Protocol):
    """What this phase needs of the connection."""

    endpoint: UpstreamEndpoint | None  # the endpoint it was connected to, if any
    sent: int
    started: float


def account(connection: Ending, reason: str) -> None:
    """Give back what the connection held and record it (once, from ``finish``)."""
    route = connection.route
    endpoint = connection.endpoint
    if endpoint is not None:
        route.pool.release(endpoint)
        connection.endpoint = None
        endpoint.stats.upstream_bytes_sent_total += connection.received
        endpoint.stats.upstream_bytes_received_total += connection.sent
    if connection.admission is not None:
        queued, connection.admission = connection.admission == "queued", None
        if route.admission is not None:
            route.admission.quit(connection, queued)
    stats = route.stats
    stats.downstream_cx_active -= 1
    stats.downstream_bytes_received_total += connection.received
    stats.downstream_bytes_sent_total += connection.sent
    duration = connection.loop.time() - connection.started
    stats.downstream_cx_length_seconds.observe(duration)
    connection.untrack()
    if route.tunables.access_log:
        log.info(
            "connection closed",
            connection=connection.id,
            service=f"{route.namespace}/{route.service}",
            port=route.port_name,
            client=connection.client,
            endpoint=str(endpoint) if endpoint is not None else None,
            bytes_received=connection.received,
            bytes_sent=connection.sent,
            duration_s=round(duration, 6),
            end=reason,
        )
