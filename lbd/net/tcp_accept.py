"""The first phase of a proxied TCP connection: from accepted to connecting.

A connection just accepted (``lbd.net.tcp_proxy.Downstream``, seen here as ``Accepting``) is
checked against loadBalancerSourceRanges and the pool, reads a trusted client's PROXY header
(which says who the client is, before anything else is decided), and asks the route's
admission (limits and queue) for a slot; then its connect tries start (``lbd.net.connect``).
Bytes that arrive meanwhile wait, bounded, in the connection (``keep``).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from lbd.endpoints.route import Route
from lbd.net import connect, proxy_protocol
from lbd.net.connections import ListenerView
from lbd.net.proxy_protocol import Address, HeaderReader, ProxyHeaderError

log = structlog.get_logger("lbd.tcp")

# Client bytes held while the upstream connect is in flight; past this, reading pauses.
PENDING_LIMIT = 16 * 1024  # as HAProxy's default buffer: bounded even for a full queue


class Accepting(connect.Attaching, Protocol):
    """What this phase needs of the connection."""

    listener: ListenerView
    header: HeaderReader | None  # a trusted client's PROXY header, while it is being read
    addresses: tuple[Address, Address] | None  # (client, destination) as the header said
    admission: str | None  # "queued" or "admitted" while in the route's Admission
    max_duration_timer: asyncio.TimerHandle | None
    received: int

    def track(self) -> None: ...  # from now on it is a live connection of the worker

    def untrack(self) -> None: ...  # no longer

    def max_duration_reached(self) -> None: ...

    def admitted(self) -> None: ...  # a queued connection got its slot (Admission calls it)

    def reject(self) -> None: ...  # reset it before it was tracked


def accepted(connection: Accepting) -> None:
    """Decide what happens to a connection the kernel just handed over."""
    route: Route = connection.route
    stats = route.stats
    listener = connection.listener
    # A trusted PROXY source is checked against the ranges once its header names the client.
    via_proxy = bool(route.trusted_proxies) and proxy_protocol.trusted(
        connection.client, route.trusted_proxies
    )
    if listener.filtered and not via_proxy and not route.allows(connection.client):
        # Refusing per client needs the connection accepted first: a reset is the best the
        # kernel lets a listening socket do without packet filtering.
        stats.downstream_cx_refused_total.source_range += 1
        connection.reject()
        return
    if not route.pool.eligible(listener.external):
        # Only in the moment before the listener stops listening (lbd.net.tcp_listener).
        stats.downstream_cx_refused_total.no_endpoint += 1
        connection.reject()
        return
    connection.track()
    loop = connection.loop
    max_duration = route.tunables.max_connection_duration
    if max_duration is not None:
        connection.max_duration_timer = loop.call_later(
            max_duration, connection.max_duration_reached
        )
    if via_proxy:
        # Read the PROXY header first: it says who the client is, before any pick.
        timer = loop.call_later(proxy_protocol.HEADER_TIMEOUT, _header_missing, connection)
        connection.header = HeaderReader(timer)
        return
    admit(connection)


def feed_header(connection: Accepting, reader: HeaderReader, data: bytes) -> None:
    try:
        header = reader.feed(data)
    except ProxyHeaderError as error:
        bad_header(connection, str(error))
        return
    if header is None:
        return
    rest, source, destination = header
    connection.header = None
    reader.close()
    if source is not None and destination is not None:
        connection.addresses = (source, destination)
        connection.client, connection.client_port = source
    route = connection.route
    if connection.listener.filtered and not route.allows(connection.client):
        route.stats.downstream_cx_refused_total.source_range += 1
        connection.finish("source_range", abort=True)
        return
    if rest:
        connection.received += len(rest)
        keep(connection, rest)
    admit(connection)


def keep(connection: Accepting, data: bytes) -> None:
    """Hold bytes that arrive before the upstream exists. Reading goes on meanwhile, so a
    client that resets or closes while lbd is still connecting is noticed at once (and its
    connect given up); past PENDING_LIMIT bytes reading pauses until the upstream exists."""
    pending = connection.pending
    if pending is None:
        pending = connection.pending = [data]
    else:
        pending.append(data)
    if sum(map(len, pending)) > PENDING_LIMIT:
        connection.reading = False  # connect.attach resumes it


def _header_missing(connection: Accepting) -> None:
    bad_header(connection, "no header within the timeout")


def bad_header(connection: Accepting, why: str) -> None:
    route = connection.route
    route.stats.downstream_cx_refused_total.proxy_header_invalid += 1
    log.warning("PROXY header rejected", route=route.label, client=connection.client, error=why)
    connection.finish("proxy_header_invalid", abort=True)


def admit(connection: Accepting) -> None:
    """Through the route's limits and queue (when it has them), then connect."""
    admission = connection.route.admission
    if admission is not None:
        verdict = admission.request(connection)
        if verdict is False:
            connection.finish("overflow", abort=True)
            return
        if verdict is None:
            connection.admission = "queued"  # Admission calls ``admitted`` or ``finish``
            return
        connection.admission = "admitted"
    connect.try_next(connection, [])


def count_under_new_limits(connection: Accepting) -> None:
    """A reload gave this port limits while the connection was open: it takes a slot, as if
    it had been admitted under them. One still reading its PROXY header is admitted (or
    queued) when the header ends, as any new connection."""
    admission = connection.route.admission
    if admission is None or connection.admission is not None or connection.header is not None:
        return  # no limits, already counted, or still to be admitted after its header
    if not connection.closed:
        admission.adopt()
        connection.admission = "admitted"
